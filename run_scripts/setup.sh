#!/usr/bin/env bash
# Sets up dwjax on a fresh Debian/Ubuntu machine: Debian packages, then a project virtualenv made from the
# system python3 (PEP 668 blocks pip outside one), then dwjax into it. Safe to run again: it reuses what is there.
#   bash run_scripts/setup.sh                                  # .venv with dwjax + the builtin teachers
#   bash run_scripts/setup.sh --extras teachers,export,test --torch --apt "flite espeak-ng sox"
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run_scripts/setup.sh [--venv DIR] [--extras LIST] [--torch] [--apt "PKG ..."]

  --venv DIR     the virtualenv to create or reuse (default: .venv in the repository root)
  --extras LIST  dwjax extras to install, comma-separated (default: teachers)
  --torch        install torch==2.13.0 first (the CPU build; tests and the openai export use it)
  --apt PKGS     Debian packages to install when missing (default: flite espeak-ng sox libsndfile1)

Needs only python3 (Debian 12: 3.11, Ubuntu 24.04: 3.12) and apt-get (as root or via sudo); installs
python3-venv when the system python3 cannot make a virtualenv. Prints the virtualenv's path last.
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="teachers"
torch=0
apt_pkgs="flite espeak-ng sox libsndfile1"
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --venv) venv="$2"; shift ;;
    --extras) extras="$2"; shift ;;
    --torch) torch=1 ;;
    --apt) apt_pkgs="$2"; shift ;;
    *) echo "setup.sh: error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

python3_bin="$(command -v python3 || true)"
if [ -z "$python3_bin" ]; then
  echo "setup.sh: error: python3 not found; install it (apt-get install python3)" >&2
  exit 1
fi

missing=()
for pkg in $apt_pkgs; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ! -x "$venv/bin/python" ] && ! "$python3_bin" -c "import ensurepip, venv" 2>/dev/null; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  echo "setup.sh: apt-get install ${missing[*]}" >&2
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup.sh: creating the virtualenv $venv from $python3_bin ($("$python3_bin" --version 2>&1))" >&2
  "$python3_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if ((torch)); then
  # first and pinned, so that nothing later pulls a CUDA build
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e "${root}[${extras}]"
echo "$venv"
