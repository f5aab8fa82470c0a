#!/usr/bin/env bash
# Cloud TPU VMs and pod slices with gcloud: create one, install wcord_jax on every worker, start a run on all workers
# at once, delete it. `--dry-run` prints each command (`+ ...`) instead of running it and needs no gcloud.
#
#   bash launch/tpu_vm.sh all --name wcord --zone us-central2-b --accelerator-type v4-32 \
#       --workdir gs://BUCKET/runs/resnet34 --config configs/teacher.py:resnet34 --data-dir gs://BUCKET/tensorflow_datasets
#   bash launch/tpu_vm.sh logs --name wcord --zone us-central2-b
#   bash launch/tpu_vm.sh delete --name wcord --zone us-central2-b
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: bash launch/tpu_vm.sh COMMAND [options] [-- extra args for wcord_jax.main]

commands:
  create    gcloud compute tpus tpu-vm create (the TPU VM or pod slice)
  install   on every worker: copy or clone the repository, make a Python ${PYTHON_VERSION} venv (with uv),
            pip install -e . "jax[tpu]"
  run       start python -m wcord_jax.main on every worker at once, under nohup (log in ~/${REMOTE_DIR}/logs/)
  all       create, install, run
  logs      print the end of worker 0's latest log
  stop      SIGTERM the run on every worker (it saves a checkpoint; \`run\` again resumes)
  delete    gcloud compute tpus tpu-vm delete --quiet

options (defaults in brackets):
  --name N                TPU name [${NAME}]
  --zone Z                zone [${ZONE}]
  --project P             project [gcloud's configured one]
  --accelerator-type T    [${ACCELERATOR_TYPE}]
  --version V             TPU software version (VM image) [${VERSION}]
  --spot                  create a Spot TPU
  --repo URL_OR_PATH      git URL to clone on the workers, or a local checkout to copy there [${REPO}]
  --python X.Y            Python version of the workers' venv [${PYTHON_VERSION}] (jax needs >= 3.11)
  --config CONFIG         [${CONFIG}]
  --workdir DIR           run directory, gs://BUCKET/... on a pod slice (required by run, all)
  --dataset NAME          --config.dataset.name [${DATASET}]
  --data-dir DIR          --config.dataset.data_dir, e.g. gs://BUCKET/tensorflow_datasets
  --teacher DIR           --config.teacher.checkpoint: the teacher run's workdir (distillation configs)
  --single-process        start each worker's run on its own (default: WCORD_DISTRIBUTED=1, one run across all
                          workers of the slice, jax.distributed.initialize)
  --dry-run               print the commands (prefixed with '+ ') instead of running them
  -h, --help              this message
EOF
}

bad_usage() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------------------------------
# Arguments

NAME=wcord-tpu
ZONE=us-central2-b
PROJECT=""
ACCELERATOR_TYPE=v4-32
VERSION=tpu-ubuntu2204-base
SPOT=0
REPO="$REPO_ROOT"
PYTHON_VERSION=3.12
CONFIG="configs/distill.py:wcord,resnet34,resnet18"
WORKDIR=""
DATASET=imagenet2012
DATA_DIR=""
TEACHER=""
DRY_RUN=0
DISTRIBUTED="WCORD_DISTRIBUTED=1 "
EXTRA=()
REMOTE_DIR=wcord_jax      # the checkout on each worker, relative to the home directory
REMOTE_VENV=wcord_venv    # the workers' virtual environment, relative to the home directory

COMMAND="${1:-}"
case "$COMMAND" in
  create|install|run|all|logs|stop|delete) shift ;;
  -h|--help|help) usage; exit 0 ;;
  "") bad_usage "missing COMMAND (create, install, run, all, logs, stop, delete)" ;;
  *) bad_usage "unknown command '$COMMAND'; valid: create, install, run, all, logs, stop, delete" ;;
esac

while [ $# -gt 0 ]; do
  opt="$1"
  case "$opt" in
    --) shift; EXTRA=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --single-process) DISTRIBUTED=""; shift; continue ;;
    --spot) SPOT=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --*=*) value="${opt#*=}"; opt="${opt%%=*}"; shift ;;
    --*)
      [ $# -ge 2 ] || bad_usage "option $opt needs a value"
      value="$2"; shift 2 ;;
    *) bad_usage "unexpected argument '$opt' (extra arguments for wcord_jax.main go after --)" ;;
  esac
  [ -n "$value" ] || bad_usage "option $opt needs a non-empty value"
  case "$opt" in
    --name) NAME="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --accelerator-type) ACCELERATOR_TYPE="$value" ;;
    --version) VERSION="$value" ;;
    --repo) REPO="$value" ;;
    --python) PYTHON_VERSION="$value" ;;
    --config) CONFIG="$value" ;;
    --workdir) WORKDIR="$value" ;;
    --dataset) DATASET="$value" ;;
    --data-dir) DATA_DIR="$value" ;;
    --teacher) TEACHER="$value" ;;
    *) bad_usage "unknown option '$opt'" ;;
  esac
done

is_url() { [[ "$1" =~ ^(https?|git|ssh|file):// || "$1" =~ ^[A-Za-z0-9._-]+@[^:/]+: ]]; }

if ! is_url "$REPO" && [ ! -d "$REPO" ]; then
  bad_usage "--repo '$REPO' is neither a git URL nor a local directory"
fi
case "$COMMAND" in
  run|all) [ -n "$WORKDIR" ] || bad_usage "$COMMAND needs --workdir (gs://BUCKET/PATH on a pod slice)" ;;
esac

# ---------------------------------------------------------------------------------------------------------------------
# Running (or printing) commands

# One word as a shell would need it: bare when safe, else single-quoted ('--opt=' stays outside the quotes).
quote() {
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  elif [[ "$s" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_always "${BASH_REMATCH[2]}"
  else
    quote_always "$s"
  fi
}
quote_always() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

quote_all() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

if [ "$DRY_RUN" = 0 ] && [ "$COMMAND" != help ] && ! command -v gcloud >/dev/null 2>&1; then
  echo "error: gcloud is not installed (https://cloud.google.com/sdk/docs/install); --dry-run prints the commands" >&2
  exit 1
fi

LOCATION=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then LOCATION+=(--project="$PROJECT"); fi
TPU=(gcloud compute tpus tpu-vm)

ssh_all() {  # ssh_all REMOTE_COMMAND: the same command on every worker, all at once
  run_cmd "${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

# ---------------------------------------------------------------------------------------------------------------------
# The steps

do_create() {
  local cmd=("${TPU[@]}" create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
  run_cmd "${cmd[@]}"
}

do_install() {
  local fetch
  if is_url "$REPO"; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $(quote "$REPO") $REMOTE_DIR; fi"
  else
    # A local checkout (uncommitted edits included) travels as a tarball to every worker.
    local tarball="${TMPDIR:-/tmp}/wcord_jax-src-$NAME.tar.gz"
    run_cmd tar -czf "$tarball" --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=.pytest_cache -C "$REPO" .
    run_cmd "${TPU[@]}" scp "$tarball" "$NAME:wcord_jax-src.tar.gz" "${LOCATION[@]}" --worker=all
    fetch="mkdir -p $REMOTE_DIR && tar -xzf wcord_jax-src.tar.gz -C $REMOTE_DIR"
  fi
  # jax >= 0.10 needs Python >= 3.11, newer than the Ubuntu 22.04 image's 3.10: uv provides one in a venv.
  local py="\$HOME/$REMOTE_VENV/bin/python"
  ssh_all "set -e; $fetch; \
python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv; \
[ -x $py ] || \$HOME/.local/bin/uv venv --seed --python $(quote "$PYTHON_VERSION") \$HOME/$REMOTE_VENV; \
cd $REMOTE_DIR; $py -m pip install -q -U pip; $py -m pip install -q -e . \"jax[tpu]\"; \
$py -c \"import jax, wcord_jax\"; echo \"\$(hostname): wcord_jax installed in ~/$REMOTE_VENV\""
}

do_run() {
  local args=(--config "$CONFIG" --workdir "$WORKDIR" --config.dataset.name="$DATASET")
  if [ -n "$DATA_DIR" ]; then args+=(--config.dataset.data_dir="$DATA_DIR"); fi
  if [ -n "$TEACHER" ]; then args+=(--config.teacher.checkpoint="$TEACHER"); fi
  args+=("${EXTRA[@]}")
  if [[ "$CONFIG" == *distill.py* && -z "$TEACHER" && " ${EXTRA[*]} " != *" --config.teacher.checkpoint="* ]]; then
    echo "warning: $CONFIG distils from a trained teacher: pass --teacher gs://.../TEACHER_WORKDIR" >&2
  fi
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "warning: --workdir $WORKDIR is on each worker's own disk; a pod slice needs one shared (gs://) workdir" >&2
  fi
  local pidfile="logs/run.pid"
  ssh_all "cd $REMOTE_DIR && mkdir -p logs || exit 1; \
if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then \
echo \"\$(hostname): a run is still going (pid \$(cat $pidfile)); stop it first\" >&2; exit 1; fi; \
log=logs/run-\$(date +%Y%m%d-%H%M%S).log; ln -sfn \"\${log#logs/}\" logs/latest.log; \
${DISTRIBUTED}nohup \$HOME/$REMOTE_VENV/bin/python -m wcord_jax.main $(quote_all "${args[@]}") > \"\$log\" 2>&1 < /dev/null & \
echo \$! > $pidfile; echo \"\$(hostname): started pid \$! (log ~/$REMOTE_DIR/\$log)\""
  if [ "$DRY_RUN" = 0 ]; then
    echo "follow it with: bash launch/tpu_vm.sh logs --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT}" >&2
  fi
}

do_logs() {
  run_cmd "${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=0 --command="tail -n 100 $REMOTE_DIR/logs/latest.log"
}

do_stop() {
  ssh_all "if [ -f $REMOTE_DIR/logs/run.pid ]; then kill -TERM \"\$(cat $REMOTE_DIR/logs/run.pid)\" 2>/dev/null || true; fi"
}

do_delete() {
  run_cmd "${TPU[@]}" delete "$NAME" "${LOCATION[@]}" --quiet
}

case "$COMMAND" in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  all) do_create; do_install; do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
