#!/usr/bin/env bash
# Stage 2: train the student on KL(teacher || student) + pseudo-label CE. Resumes from the run's checkpoints.
#   run_scripts/distill.sh --topology tpu_configs/cpu.yaml --config experiment.yaml train.per_device_batch_size=4
# Runs: dwjax distill [--topology YAML] --config YAML [key=value ...]
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/distill.sh [--topology YAML] --config YAML [KEY=VALUE ...]

Distil a student as described by the experiment config, with optional overrides.

options (each may instead be given as the environment variable in brackets):
  --topology YAML   topology file or name in tpu_configs/ (v4-32, gpu-8xh100, cpu, ...)  [TOPOLOGY]
  --config YAML     experiment config                                                    [CONFIG]
  KEY=VALUE         config overrides, e.g. optim.learning_rate=3e-4 run.output_dir=gs://bucket/run
  -h, --help        print this help and exit
environment: DWJAX (the command to run, default "dwjax"; e.g. "python -m dwjax")
USAGE
}

topology="${TOPOLOGY:-}"
config="${CONFIG:-}"
rest=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --topology) topology="${2:?--topology needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --) shift; rest+=("$@"); break ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [[ -z "$config" ]]; then
  echo "distill.sh: error: --config is required" >&2
  usage >&2
  exit 2
fi

read -r -a dwjax_cmd <<<"${DWJAX:-dwjax}"
cmd=("${dwjax_cmd[@]}" distill --config "$config")
if [[ -n "$topology" ]]; then cmd+=(--topology "$topology"); fi
cmd+=("${rest[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
