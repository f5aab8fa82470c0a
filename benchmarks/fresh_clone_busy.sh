#!/usr/bin/env bash
# The README's two commands as a new user runs them, on a fresh clone in a fresh virtualenv, while N other CPU-bound
# processes compete for the cores (a busy laptop, a shared VM, a second experiment):
#
#   bash benchmarks/fresh_clone_busy.sh [--busy N] [--dir DIR] [--ref REF]     # defaults: 2, a new temp dir, HEAD
#
# Clones REF of this repository into DIR/repo, makes DIR/venv, installs PyTorch's CPU build as CI does (for the
# teacher-import tests), starts N `while True: pass` processes (killed on exit), then runs `bash launch/demo.sh` and
# `python -m pytest -q` there. Prints each command's exit status and wall time; their logs stay in DIR. Exit status:
# 0 when both passed. XLA_FLAGS and the other variables of this shell are passed on as they are (set
# XLA_FLAGS=--xla_cpu_max_isa=AVX2 to run it on a capped instruction set).
set -uo pipefail
BUSY=2 DIR="" REF=HEAD
while [ $# -gt 0 ]; do
  case "$1" in
    --busy) BUSY="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    *) echo "error: unknown argument $1; valid: --busy N, --dir DIR, --ref REF" >&2; exit 2 ;;
  esac
done
SRC="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${DIR:-$(mktemp -d)}"
mkdir -p "$DIR"
git clone -q "$SRC" "$DIR/repo" && git -C "$DIR/repo" checkout -q "$REF" || exit 1
python3 -m venv "$DIR/venv" || exit 1
# shellcheck disable=SC1091
source "$DIR/venv/bin/activate"
python -m pip install -q --upgrade pip && python -m pip install -q 'torch==2.13.0' || exit 1
PIDS=()
for _ in $(seq "$BUSY"); do python3 -c "while True: pass" & PIDS+=($!); done
trap '[ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null' EXIT
echo "$(date -u +%H:%M:%S) $(git -C "$DIR/repo" rev-parse --short HEAD) in $DIR; $BUSY busy process(es); $(nproc) cores;" \
  "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1); XLA_FLAGS=${XLA_FLAGS:-}"
cd "$DIR/repo" || exit 1
status=0
for cmd in "bash launch/demo.sh" "python -m pytest -q"; do
  start=$(date +%s)
  log="$DIR/$(echo "$cmd" | tr ' /' '__').log"
  $cmd > "$log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  echo "$(date -u +%H:%M:%S) $cmd: exit $rc after $(( $(date +%s) - start )) s; last line: $(tail -n 1 "$log")"
done
exit $status
