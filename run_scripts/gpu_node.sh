#!/usr/bin/env bash
# Run a stage on one GPU node: one process drives all of its GPUs (8 x H100 topology by default).
#   run_scripts/gpu_node.sh distill --config experiment.yaml
#   TOPOLOGY=my-4gpu.yaml run_scripts/gpu_node.sh distill --config experiment.yaml
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/gpu_node.sh STAGE [STAGE ARGS...]

Run STAGE (pseudo-label, distill or evaluate) on all GPUs of this node in one process;
STAGE ARGS are those of run_scripts/STAGE.sh (see its --help).

environment:
  TOPOLOGY               topology for distill (default tpu_configs/gpu-8xh100.yaml)
  CUDA_VISIBLE_DEVICES   restrict the GPUs used (then use a topology with that many devices)
  XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (default 0.92)
  DWJAX                  the command to run (default "dwjax")
USAGE
}

if (($# == 0)); then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
stage="${1//-/_}"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$here/$stage.sh" ]]; then
  echo "gpu_node.sh: error: unknown stage ${stage}; use pseudo-label, distill or evaluate" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader >&2
else
  echo "gpu_node.sh: warning: nvidia-smi not found; is this a GPU node?" >&2
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export TOPOLOGY="${TOPOLOGY:-$here/../tpu_configs/gpu-8xh100.yaml}"
exec bash "$here/$stage.sh" "$@"
