#!/usr/bin/env bash
# The main job on the embedded default: distil the bundled teacher on a synthesised demo set, end to end.
#   bash run_scripts/demo.sh                 # set up (apt + pip) and run everything under runs/demo
#   bash run_scripts/demo.sh --no-setup      # skip the installs
# Stages: make-demo-data -> pseudo-label -> init-student -> distill -> evaluate (teacher vs student).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/demo.sh [--no-setup] [--out DIR]

Sets up dwjax with run_scripts/setup.sh (Debian: flite espeak-ng sox; a virtualenv .venv made from the system
python3 with this package and the builtin teachers), then:
  1. dwjax make-demo-data   synthesise HOURS of speech with flite/espeak-ng
  2. dwjax pseudo-label     label it with the teacher
  3. dwjax init-student     teacher encoder + 2 maximally spaced decoder layers
  4. dwjax distill          KL + pseudo-label CE, STEPS steps
  5. dwjax evaluate         WER and speed of teacher and student on the held-out split

environment:
  TEACHER   teacher model (default builtin:whisper-tiny.en)
  HOURS     hours of demo speech (default 0.2)
  STEPS     distillation steps (default 150)
  BATCH     per-device batch (default 8)
  DWJAX_VENV  the virtualenv to make or use (default: .venv in the repository root)
USAGE
}

setup=1
out="runs/demo"
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-setup) setup=0 ;;
    --out) out="$2"; shift ;;
    *) echo "demo.sh: error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
teacher="${TEACHER:-builtin:whisper-tiny.en}"
hours="${HOURS:-0.2}"
steps="${STEPS:-150}"
batch="${BATCH:-8}"

venv="${DWJAX_VENV:-$here/../.venv}"
if ((setup)); then
  bash "$here/setup.sh" --venv "$venv" --extras teachers --apt "flite espeak-ng sox libsndfile1" >/dev/null
fi
# the project virtualenv when there is one (setup.sh made it); otherwise whatever `dwjax` is on PATH
if [ -x "$venv/bin/dwjax" ]; then
  PATH="$(cd "$venv/bin" && pwd):$PATH"
  export PATH
fi
command -v dwjax >/dev/null || { echo "demo.sh: error: dwjax is not installed; run without --no-setup" >&2; exit 1; }

mkdir -p "$out"
dwjax make-demo-data --output "$out/data" --hours "$hours"
dwjax pseudo-label --teacher "$teacher" --data "$out/data/train.jsonl" --output "$out/labels"
if [ ! -f "$out/student-init/dwjax_config.json" ]; then
  dwjax init-student --teacher "$teacher" --decoder-layers 2 --output "$out/student-init"
fi
dwjax distill model.teacher="$teacher" model.student="$out/student-init" \
  "data.train=[{name: demo, path: $out/labels}]" "data.eval=[{name: validation, path: $out/data/validation.jsonl}]" \
  run.output_dir="$out/distill" optim.total_steps="$steps" optim.warmup_steps=$((steps / 10)) \
  optim.learning_rate=3e-4 train.per_device_batch_size="$batch" train.log_every=10 train.eval_every=0 \
  checkpoint.save_every=100 train.max_eval_samples=64
for who in teacher student; do
  model="$teacher"; [ "$who" = student ] && model="$out/distill/student"
  dwjax evaluate --model "$model" --data "test=$out/data/test.jsonl" --output "$out/eval-$who.json"
done
dwjax report "$out/eval-teacher.json" "$out/eval-student.json" --output "$out/report"
echo "demo finished: $out/report/report.md"
