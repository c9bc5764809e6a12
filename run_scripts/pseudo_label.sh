#!/usr/bin/env bash
# Stage 1: label a dataset with the teacher (sharded over all devices/processes, resumable).
#   run_scripts/pseudo_label.sh --teacher builtin:whisper-tiny.en --data demo_data/train.jsonl --output outputs/labels
# Runs: dwjax pseudo-label --teacher MODEL --data DATA --output DIR [--config YAML] [EXTRA...]
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/pseudo_label.sh [--teacher MODEL] --data DATA --output DIR [--config YAML] [-- EXTRA...]

Label DATA with the teacher MODEL and write the labelled manifest to DIR.

options (each may instead be given as the environment variable in brackets):
  --teacher MODEL   teacher: builtin:NAME or a model path       [TEACHER, default builtin:whisper-tiny.en]
  --data DATA       manifest (JSONL/CSV/TSV/parquet) or dataset [DATA]
  --output DIR      where the labelled manifest goes             [OUTPUT]
  --config YAML     experiment config                            [CONFIG]
  -- EXTRA...       further arguments passed to dwjax pseudo-label
  -h, --help        print this help and exit
environment: DWJAX (the command to run, default "dwjax"; e.g. "python -m dwjax")
USAGE
}

teacher="${TEACHER:-builtin:whisper-tiny.en}"
data="${DATA:-}"
output="${OUTPUT:-}"
config="${CONFIG:-}"
extra=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --teacher) teacher="${2:?--teacher needs a value}"; shift 2 ;;
    --data) data="${2:?--data needs a value}"; shift 2 ;;
    --output) output="${2:?--output needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [[ -z "$data" || -z "$output" ]]; then
  echo "pseudo_label.sh: error: --data and --output are required" >&2
  usage >&2
  exit 2
fi

read -r -a dwjax_cmd <<<"${DWJAX:-dwjax}"
cmd=("${dwjax_cmd[@]}" pseudo-label --teacher "$teacher" --data "$data" --output "$output")
if [[ -n "$config" ]]; then cmd+=(--config "$config"); fi
cmd+=("${extra[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
