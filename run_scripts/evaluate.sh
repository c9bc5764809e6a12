#!/usr/bin/env bash
# Stage 3: WER (and speed) of a model on one or more evaluation sets.
#   run_scripts/evaluate.sh --model runs/cpu/student --data demo_data/test.jsonl
# Runs: dwjax evaluate --model MODEL --data DATA... [EXTRA...]
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/evaluate.sh --model MODEL --data DATA [--data DATA ...] [-- EXTRA...]

Evaluate MODEL on each DATA.

options (each may instead be given as the environment variable in brackets; space-separated lists):
  --model MODEL     model: builtin:NAME, a student/export directory, or a checkpoint  [MODEL]
  --data DATA       evaluation manifest or dataset                                    [DATA]
  -- EXTRA...       further arguments passed to dwjax evaluate (e.g. --output DIR)
  -h, --help        print this help and exit
environment: DWJAX (the command to run, default "dwjax"; e.g. "python -m dwjax")
USAGE
}

model="${MODEL:-}"
datas=()
extra=()
if [[ -n "${DATA:-}" ]]; then read -r -a datas <<<"$DATA"; fi
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --model) model="${2:?--model needs a value}"; shift 2 ;;
    --data) datas+=("${2:?--data needs a value}"); shift 2 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [[ -z "$model" ]] || ((${#datas[@]} == 0)); then
  echo "evaluate.sh: error: --model and at least one --data are required" >&2
  usage >&2
  exit 2
fi

read -r -a dwjax_cmd <<<"${DWJAX:-dwjax}"
cmd=("${dwjax_cmd[@]}" evaluate --model "$model" --data "${datas[@]}" "${extra[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
