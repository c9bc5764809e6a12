#!/usr/bin/env bash
# Run a stage on every worker of a Cloud TPU VM pod, creating the pod (and recreating it after preemption).
#   run_scripts/tpu_pod.sh --name dw-v4-32 --zone us-central2-b --accelerator v4-32 --spot distill --config exp.yaml
#   run_scripts/tpu_pod.sh --name dw-v4-32 --zone us-central2-b delete
# Each worker runs run_scripts/STAGE.sh with DWJAX_DISTRIBUTED=1 (one dwjax process per host). After a
# preemption the pod is recreated, dwjax reinstalled and the stage rerun: distill resumes from the newest
# checkpoint in run.output_dir, so that must be durable storage (gs://...), not the VM's disk.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/tpu_pod.sh [OPTIONS] STAGE [STAGE ARGS...]
       run_scripts/tpu_pod.sh [OPTIONS] create|install|status|delete

STAGE is pseudo-label, distill or evaluate: it runs run_scripts/STAGE.sh with STAGE ARGS on every worker
(see run_scripts/STAGE.sh --help). The pod is created if missing; after a preemption it is recreated and
the stage rerun (distill resumes from its latest checkpoint; keep run.output_dir on gs://).

options (each may instead be given as the environment variable in brackets):
  --name NAME          TPU VM name                                   [TPU_NAME]  (required)
  --zone ZONE          zone, e.g. us-central2-b                      [TPU_ZONE]  (required)
  --project PROJECT    GCP project (default: gcloud's)               [GCP_PROJECT]
  --accelerator TYPE   v4-8, v4-32, v5litepod-16, v5p-64, v6e-8, ... [TPU_TYPE]  (needed to create)
  --runtime VERSION    TPU software version (default: by type)       [TPU_RUNTIME]
  --topology NAME      topology for distill (default: tpu_configs/ matching TYPE, e.g. v5e-16) [TOPOLOGY]
  --spot               create a Spot (preemptible) pod               [TPU_SPOT=1]
  --max-restarts N     recreate after preemption at most N times (default 20) [MAX_RESTARTS]
  --jax-spec SPEC      pip requirement for JAX on TPU (default "jax[tpu]") [JAX_SPEC]
  --dry-run            print the gcloud commands instead of running them [DRY_RUN=1]
  -h, --help           print this help and exit
USAGE
}

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${GCP_PROJECT:-}"
accel="${TPU_TYPE:-}"
runtime="${TPU_RUNTIME:-}"
topology="${TOPOLOGY:-}"
spot="${TPU_SPOT:-0}"
max_restarts="${MAX_RESTARTS:-20}"
jax_spec="${JAX_SPEC:-jax[tpu]}"
dry_run="${DRY_RUN:-0}"
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --accelerator) accel="${2:?--accelerator needs a value}"; shift 2 ;;
    --runtime) runtime="${2:?--runtime needs a value}"; shift 2 ;;
    --topology) topology="${2:?--topology needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
    --jax-spec) jax_spec="${2:?--jax-spec needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -*) echo "tpu_pod.sh: error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if (($# == 0)) || [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_pod.sh: error: --name, --zone and an action or STAGE are required" >&2
  usage >&2
  exit 2
fi
action="$1"
shift

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
remote_dir="dwjax"  # relative to each worker's home directory

if [[ -z "$runtime" ]]; then
  case "$accel" in
    v5litepod*|v5e*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p*) runtime="v2-alpha-tpuv5" ;;
    v6e*) runtime="v2-alpha-tpuv6e" ;;
    *) runtime="tpu-ubuntu2204-base" ;;
  esac
fi
if [[ -z "$topology" && -n "$accel" ]]; then
  candidate="${accel/v5litepod/v5e}"
  if [[ -f "$repo/tpu_configs/$candidate.yaml" ]]; then topology="tpu_configs/$candidate.yaml"; fi
fi

where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi

gc() {  # gcloud, or its echo under --dry-run
  if [[ "$dry_run" == 1 ]]; then
    echo "+ gcloud $*"
  else
    gcloud "$@"
  fi
}

pod_state() {  # READY, CREATING, PREEMPTED, TERMINATED, ..., or MISSING
  if [[ "$dry_run" == 1 ]]; then echo "READY"; return; fi
  gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || echo "MISSING"
}

create_pod() {
  if [[ -z "$accel" ]]; then
    echo "tpu_pod.sh: error: pod $name does not exist; give --accelerator to create it" >&2
    exit 2
  fi
  local flags=(--accelerator-type "$accel" --version "$runtime")
  if [[ "$spot" == 1 ]]; then flags+=(--spot); fi
  echo "tpu_pod: creating $name ($accel, $runtime) in $zone" >&2
  gc compute tpus tpu-vm create "$name" "${where[@]}" "${flags[@]}"
}

delete_pod() {
  echo "tpu_pod: deleting $name" >&2
  gc compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
}

wait_ready() {
  local state
  for _ in $(seq 1 120); do
    state="$(pod_state)"
    case "$state" in
      READY) return 0 ;;
      MISSING) create_pod ;;
      PREEMPTED|TERMINATED|STOPPED) delete_pod; create_pod ;;
      *) echo "tpu_pod: $name is $state; waiting" >&2; sleep 30 ;;
    esac
  done
  echo "tpu_pod.sh: error: $name did not become READY" >&2
  exit 1
}

on_all() {  # run a shell command on every worker
  gc compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"
}

install() {  # copy this checkout to every worker and pip-install it with JAX for TPU
  local tarball
  tarball="$(mktemp -t dwjax-src.XXXXXX)"
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -co --exclude-standard -z | tar -C "$repo" --null -T - -czf "$tarball"
  else
    tar -C "$repo" --exclude=runs --exclude=outputs --exclude=demo_data --exclude=.git -czf "$tarball" .
  fi
  echo "tpu_pod: installing dwjax on all workers of $name" >&2
  gc compute tpus tpu-vm scp "$tarball" "$name:dwjax-src.tgz" "${where[@]}" --worker=all
  rm -f "$tarball"
  on_all "set -e; rm -rf $remote_dir && mkdir -p $remote_dir && tar -C $remote_dir -xzf dwjax-src.tgz && \
python3 -m pip install -q -U pip && python3 -m pip install -q -U '$jax_spec' && \
python3 -m pip install -q -e './${remote_dir}[teachers]'"
}

run_stage() {  # the stage on every worker; returns its exit status
  local script="run_scripts/${action//-/_}.sh" args env
  args="$(printf '%q ' "$@")"
  env="DWJAX_DISTRIBUTED=1 PATH=\$HOME/.local/bin:\$PATH"
  if [[ -n "$topology" ]]; then env+=" TOPOLOGY=$(printf '%q' "$topology")"; fi
  on_all "cd $remote_dir && $env bash $script $args"
}

case "$action" in
  create) wait_ready; install; exit 0 ;;
  install) wait_ready; install; exit 0 ;;
  status) pod_state; exit 0 ;;
  delete) delete_pod; exit 0 ;;
  pseudo-label|pseudo_label|distill|evaluate) ;;
  *) echo "tpu_pod.sh: error: unknown action or stage $action" >&2; usage >&2; exit 2 ;;
esac
if [[ "$action" == distill && -z "$topology" ]]; then
  echo "tpu_pod: warning: no tpu_configs/ file for ${accel:-this pod}; pass --topology" >&2
fi

restarts=0
while true; do
  wait_ready
  install
  if run_stage "$@"; then
    echo "tpu_pod: $action finished on $name" >&2
    exit 0
  fi
  state="$(pod_state)"
  if [[ "$state" == READY ]]; then
    echo "tpu_pod.sh: error: $action failed on $name (pod still READY, so not a preemption)" >&2
    exit 1
  fi
  restarts=$((restarts + 1))
  if ((restarts > max_restarts)); then
    echo "tpu_pod.sh: error: $name preempted $restarts times; giving up (--max-restarts $max_restarts)" >&2
    exit 1
  fi
  echo "tpu_pod: $name is $state (preempted?); recreating and resuming, restart $restarts/$max_restarts" >&2
done
