#!/usr/bin/env bash
# Runs a jaxllm command on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e), creating it if asked.
#
#   launch/tpu_pod.sh --name my-pod --zone us-east5-a --accelerator v5p-128 --create -- \
#       jaxllm train configs/llama3-70b.yaml run_dir=/gcs/my-bucket/runs/llama3-70b
#
# Steps: (1) with --create, `gcloud compute tpus tpu-vm create`; (2) pack this checkout (git archive
# of HEAD, or a tar of the tree with --working-tree) and copy it to every worker; (3) install it in
# a virtualenv with the TPU extra on every worker; (4) start the same command on every worker at once.
# Each worker is one JAX process; `jaxllm.distributed` finds the others from the TPU metadata.
# run_dir must be shared by all workers (a gcsfuse mount of a GCS bucket, or Filestore/NFS).
# --skip-install reuses what an earlier run installed; --dry-run prints the gcloud commands.
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "options: --name NAME --zone ZONE [--project P] [--accelerator v5p-8] [--version RUNTIME] [--create]" >&2
  echo "         [--spot] [--working-tree] [--skip-install] [--dry-run] -- COMMAND ..." >&2
  exit 2
}

NAME="" ZONE="" PROJECT="" ACCELERATOR="v5p-8" VERSION="" CREATE="" SPOT="" TREE="" SKIP_INSTALL="" DRY_RUN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --create) CREATE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --working-tree) TREE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[ -n "$NAME" ] && [ -n "$ZONE" ] || { echo "error: --name and --zone are required" >&2; usage; }
[ $# -gt 0 ] || { echo "error: give the command to run after --, e.g. -- jaxllm train configs/llama3-8b.yaml" >&2; usage; }

if [ -z "$VERSION" ]; then
  # The TPU VM runtime image of each generation.
  case "$ACCELERATOR" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) echo "error: unknown accelerator $ACCELERATOR; pass --version RUNTIME_IMAGE" >&2; exit 2 ;;
  esac
fi
# gcloud calls v5e slices v5litepod-N.
GCLOUD_ACCELERATOR="${ACCELERATOR/#v5e-/v5litepod-}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHERE=(--zone="$ZONE")
[ -n "$PROJECT" ] && WHERE+=(--project="$PROJECT")

run() {
  if [ -n "$DRY_RUN" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ -n "$CREATE" ]; then
  CREATE_CMD=(gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$GCLOUD_ACCELERATOR"
              --version="$VERSION")
  [ -n "$SPOT" ] && CREATE_CMD+=(--spot)
  run "${CREATE_CMD[@]}"
fi

if [ -z "$SKIP_INSTALL" ]; then
  ARCHIVE="${TMPDIR:-/tmp}/jaxllm-$NAME.tar.gz"
  if [ -n "$TREE" ]; then
    run tar -czf "$ARCHIVE" -C "$ROOT" --exclude=.venv --exclude=.git --exclude=runs --exclude=__pycache__ .
  else
    run git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
  fi
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:jaxllm.tar.gz" "${WHERE[@]}" --worker=all
  INSTALL='rm -rf ~/jaxllm && mkdir -p ~/jaxllm && tar -xzf ~/jaxllm.tar.gz -C ~/jaxllm && cd ~/jaxllm'
  INSTALL+=' && python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip'
  INSTALL+=" && pip install -q -e '.[tpu]'"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$INSTALL"
fi

COMMAND="$(printf '%q ' "$@")"
run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="cd ~/jaxllm && . .venv/bin/activate && PYTHONUNBUFFERED=1 $COMMAND"
