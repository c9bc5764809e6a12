#!/usr/bin/env bash
# Run a stage on this machine's CPU with 8 fake devices (data 4 x FSDP 2), the tiny CPU topology.
#   run_scripts/local_cpu.sh distill --config experiment.yaml
#   run_scripts/local_cpu.sh pseudo-label --data demo_data/train.jsonl --output outputs/labels
# distill gets --topology tpu_configs/cpu.yaml unless TOPOLOGY says otherwise.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/local_cpu.sh STAGE [STAGE ARGS...]

Run STAGE (pseudo-label, distill or evaluate) on the CPU with 8 fake JAX devices;
STAGE ARGS are those of run_scripts/STAGE.sh (see its --help).

environment:
  CPU_DEVICES   number of fake CPU devices (default 8; the cpu topology expects 8)
  TOPOLOGY      topology for distill (default tpu_configs/cpu.yaml)
  DWJAX         the command to run (default "dwjax")
USAGE
}

if (($# == 0)); then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
stage="${1//-/_}"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$here/$stage.sh" ]]; then
  echo "local_cpu.sh: error: unknown stage ${stage}; use pseudo-label, distill or evaluate" >&2
  exit 2
fi

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${CPU_DEVICES:-8} ${XLA_FLAGS:-}"
export TOPOLOGY="${TOPOLOGY:-$here/../tpu_configs/cpu.yaml}"
exec bash "$here/$stage.sh" "$@"
