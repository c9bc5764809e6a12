#!/usr/bin/env bash
# The main job on the embedded default: distil the bundled teacher on real acted speech (two freeware games'
# voice casts, from Debian) plus synthesised speech (and kathleen's train split where ../shared/data is present),
# packed into <= 24 s windows, end to end.
#   bash run_scripts/demo.sh                 # set up (apt + a virtualenv) and run everything under runs/demo
#   bash run_scripts/demo.sh --no-setup      # skip the installs
# Stages: get-game-speech + make-demo-data -> pseudo-label --pack -> init-student -> distill (encoder cache)
#         -> evaluate (teacher, untrained student, distilled student) -> report.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/demo.sh [--no-setup] [--out DIR]

Sets up dwjax with run_scripts/setup.sh (Debian: flite espeak-ng sox; a virtualenv .venv made from the system
python3 with this package and the builtin teachers), then:
  1. dwjax get-game-speech  real acted speech (apt-get download of two freeware games; no transcripts), split by
                            speaker into train / held-out, TRAIN_HOURS of it kept for training
     dwjax make-demo-data   HOURS of synthesised speech with references (flite/espeak-ng)
  2. dwjax pseudo-label     the teacher labels both, packed into <= 24 s windows with timestamps (PACK_SHORT of
                            the windows filled only to a random length: short audio then silence, as in
                            short-form use)
  3. dwjax init-student     teacher encoder + DECODER_LAYERS maximally spaced decoder layers (3 of tiny.en's 4:
                            layers 0, 1, 3; README, "A 4-3 student")
  4. dwjax distill          KL + pseudo-label CE for STEPS steps on the packed windows (labels without references
                            filtered by the teacher's confidence; the teacher encoder's output cached on disk;
                            the token and position embeddings kept frozen: README, "freezing the embeddings")
  5. dwjax evaluate         WER and speed of the teacher, the untrained student and the distilled student on the
                            synthetic test split and on REAL_EVAL (at most EVAL_SAMPLES clips a set)
  6. dwjax report           runs/demo/report/report.md and a plot

environment:
  TEACHER     teacher model (default builtin:whisper-tiny.en)
  GAMES       which voice casts to train on (default fotaq,bass: both)
  TRAIN_HOURS hours of game speech to train on (default 2; the same share of every speaker)
  PACK_SHORT  fraction of packed windows filled only to a random length (default 0.25)
  PACKAGES    a folder holding the two games' .deb files (skips the download)
  HOURS       hours of synthesised speech (default 0.2)
  DECODER_LAYERS student decoder layers (default 3)
  STEPS       distillation steps (default 300)
  RUN_ON      data.run_on_fraction: packed windows that run on into the next one up to 30 s (default 0; README,
              "Long-form with the main job's student")
  BATCH       per-device batch of 30 s windows (default 8)
  REAL_EVAL   space-separated NAME=MANIFEST sets of real speech with references to score on (default: where
              ../shared/data/real exists beside the repository, all of dctts and a 10 % split of kathleen, neither
              trained on; otherwise none)
  REAL_TRAIN  space-separated NAME=MANIFEST sets of real speech with references to train on as well (labelled,
              WER-filtered per packed window; default: where ../shared/data/real exists, the other 90 % of
              kathleen; otherwise none; REAL_TRAIN= turns it off)
  EVAL_SAMPLES at most this many clips of each evaluation set (default 100)
  INIT_EVAL_SAMPLES  at most this many for the untrained student (default 30: it writes the same phrase to the
              448-token limit on every clip, which makes it the slowest of the three to score)
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
steps="${STEPS:-300}"
decoder_layers="${DECODER_LAYERS:-3}"
games="${GAMES:-fotaq,bass}"
train_hours="${TRAIN_HOURS:-2}"
pack_short="${PACK_SHORT:-0.25}"
eval_samples="${EVAL_SAMPLES:-100}"
init_eval_samples="${INIT_EVAL_SAMPLES:-30}"
batch="${BATCH:-8}"
run_on="${RUN_ON:-0}"

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
shared="$here/../../shared/data"
if [ -z "${REAL_EVAL+set}" ] && [ -f "$shared/real/manifest.tsv" ]; then
  # held-out real read speech with transcripts (../shared/data: all of dctts, the 10 % hash split of kathleen;
  # the same split as benchmarks/paper_scale.py, whose split_real writes it)
  python3 -c 'import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import paper_scale as p
for folder, held in (("dctts", 100), ("kathleen", 10)): p.split_real(Path(sys.argv[2]), folder, Path(sys.argv[3]), held)' \
    "$here/../benchmarks" "$shared" "$out/real"
  REAL_EVAL="dctts=$out/real/dctts-heldout.jsonl kathleen=$out/real/kathleen-heldout.jsonl"
  if [ -z "${REAL_TRAIN+set}" ]; then REAL_TRAIN="kathleen=$out/real/kathleen-train.jsonl"; fi
fi
read -r -a real_eval <<< "${REAL_EVAL:-}"
read -r -a real_train <<< "${REAL_TRAIN:-}"
# exit 1 from a stage over many inputs means "some inputs failed, each named above, the rest done": go on
tolerate_some_failed() {
  local rc=$?
  [ "$rc" -eq 1 ] && [ -e "$1" ] || exit "$rc"
  echo "demo.sh: some inputs failed (named above); going on with the others" >&2
}

if [ ! -f "$out/games/train.jsonl" ]; then
  dwjax get-game-speech --output "$out/games" --games "$games" --holdout 0.1 --train-hours "$train_hours" \
    ${PACKAGES:+--packages-dir "$PACKAGES"} || tolerate_some_failed "$out/games/train.jsonl"
fi
dwjax make-demo-data --output "$out/data" --hours "$hours"
dwjax pseudo-label --pack --pack-short "$pack_short" --teacher "$teacher" --data "games=$out/games/train.jsonl" \
  "synthetic=$out/data/train.jsonl" "${real_train[@]}" --output "$out/labels" || tolerate_some_failed "$out/labels/summary.json"
if [ ! -f "$out/student-init/dwjax_config.json" ]; then
  dwjax init-student --teacher "$teacher" --decoder-layers "$decoder_layers" --output "$out/student-init"
fi
dwjax distill model.teacher="$teacher" model.student="$out/student-init" \
  "data.train=[{name: mix, path: $out/labels}]" run.output_dir="$out/distill" \
  optim.total_steps="$steps" optim.warmup_steps=$((steps / 10)) optim.learning_rate=3e-4 \
  train.per_device_batch_size="$batch" train.log_every=10 eval.every=0 checkpoint.save_every=100 \
  train.encoder_cache="$out/encoder-cache" data.timestamp_probability=0.5 data.prev_context_probability=0.2 \
  data.label_bucket=32 data.run_on_fraction="$run_on" \
  "optim.frozen=[embed_tokens, embed_positions]"

sets=("synthetic=$out/data/test.jsonl" "${real_eval[@]}")
for who in teacher student-init student; do
  n="$eval_samples"
  case "$who" in
    teacher) model="$teacher" ;;
    student-init) model="$out/student-init"; n="$init_eval_samples" ;;
    student) model="$out/distill/student" ;;
  esac
  dwjax evaluate --model "$model" --data "${sets[@]}" --max-samples "$n" --output "$out/eval-$who.json" \
    || tolerate_some_failed "$out/eval-$who.json"
done
dwjax report "$out/eval-teacher.json" "$out/eval-student-init.json" "$out/eval-student.json" --output "$out/report"
echo "demo finished: $out/report/report.md"
