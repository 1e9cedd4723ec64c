#!/usr/bin/env bash
# Set up propulsion-ds in the current Python environment (activate a venv first if you use one).
#   bash scripts/install.sh          # the trainer and the tools the README uses (peft, gguf)
#   bash scripts/install.sh --dev    # + test/bench tools, lm-eval (the eval extra), and the MPI and SLURM packages the tests use
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1

have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }
apt_install() {
  local missing=()
  for p in "$@"; do have_pkg "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install.sh: please install these system packages: ${missing[*]}" >&2; return 0
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# mpi4py builds against an MPI library; the tests also bring up a real local SLURM.
apt_install libopenmpi-dev openmpi-bin
[ $dev = 1 ] && apt_install slurmctld slurmd slurm-client munge iproute2

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
python -m pip install -q torch==2.13.0
extras=""; [ $dev = 1 ] && extras="[dev,eval]"   # the tests run lm-eval on the shipped tasks
DS_BUILD_OPS=0 python -m pip install -q -e ".${extras}"
echo "install.sh: propulsion-ds installed$([ $dev = 1 ] && echo ' with dev and eval extras')"
