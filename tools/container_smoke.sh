#!/usr/bin/env bash
# Builds the CPU image from the repo's Dockerfile and checks that `lmjax serve` answers from inside it:
#
#   tools/container_smoke.sh [RUN_DIR]      # default: trains a tiny run first (~30 s)
#
# Where no registry is reachable the base image is a Debian root filesystem made by debootstrap (cached in
# $LMJAX_CACHE_DIR or ~/.cache/lmjax, ~45 s the first time) and imported into buildah's storage;
# `buildah bud --isolation chroot` builds the Dockerfile on it and `buildah run --isolation chroot` starts the
# image's entrypoint (`lmjax serve`) with the run directory mounted at /runs/model. The host then waits for
# /health and asks for a chat completion. Exits 0 with "SKIP: ..." where buildah cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${LMJAX_CACHE_DIR:-$HOME/.cache/lmjax}
ROOTFS=$CACHE/rootfs/bookworm
BASE=localhost/lmjax-base:bookworm
IMAGE=localhost/lmjax:cpu
PORT=${PORT:-18000}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}  # overlay needs kernel support a sandbox may lack

need() {  # installs Debian packages for the given commands, or skips the smoke test
  local missing=()
  for cmd in "$@"; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    return
  fi
  echo "SKIP: cannot install ${missing[*]} (needs root and apt): the container smoke test did not run"
  exit 0
}
need buildah debootstrap curl

if ! buildah images --format '{{.Name}}:{{.Tag}}' | grep -qx "$BASE"; then
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    echo "== debootstrap: Debian bookworm with python3 into $ROOTFS"
    mkdir -p "$(dirname "$ROOTFS")"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" \
      http://deb.debian.org/debian >/dev/null
  fi
  echo "== importing the root filesystem as $BASE"
  # The host's CA bundle, so that pip inside the build trusts what the host trusts (e.g. a TLS proxy in
  # front of the package index).
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  tar -C "$ROOTFS" -cf "$ROOTFS.tar" .
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$ROOTFS.tar" / >/dev/null  # a tar archive is unpacked
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$ctr"
  buildah commit -q "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
  rm "$ROOTFS.tar"
  unset ctr
fi

RUN=${1:-}
WORK=$(mktemp -d)
cleanup() {  # keeps the script's exit status
  local status=$?
  set +e
  if [ -n "${server:-}" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  if [ -n "${ctr:-}" ]; then buildah rm "$ctr" >/dev/null 2>&1; fi
  buildah rmi --prune >/dev/null 2>&1  # earlier builds' images, now untagged (vfs keeps full copies)
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
if [ -z "$RUN" ]; then
  echo "== training a tiny run"
  RUN=$WORK/run
  .venv/bin/lmjax train --config configs/tiny.py --workdir "$RUN" --config.model.num_layers=2 \
    --config.model.d_model=64 --config.model.d_ff=128 --config.model.seq_len=64 --config.model.dtype=float32 \
    --config.tokenizer.vocab_size=512 --config.train.steps=8 --config.train.batch_size=8 \
    --config.train.eval_every=8 --config.train.ckpt_every=8 >/dev/null
fi
chmod -R a+rwX "$RUN"  # the image runs as uid 1000 and writes feedback.sqlite into the run directory

echo "== buildah bud (TARGET=cpu, BASE=$BASE)"
start=$(date +%s)
buildah bud -q --format docker --isolation chroot --build-arg BASE="$BASE" --build-arg TARGET=cpu -t "$IMAGE" . >/dev/null
echo "   built in $(( $(date +%s) - start )) s"

echo "== lmjax serve inside the image on 127.0.0.1:$PORT"
ctr=$(buildah from "$IMAGE")
buildah run --isolation chroot -v "$(realpath "$RUN")":/runs/model "$ctr" -- \
  lmjax serve --workdir /runs/model --port "$PORT" --slots 2 > "$WORK/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 300); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" || true)
  [ "$code" = 200 ] && break
  kill -0 "$server" 2>/dev/null || { cat "$WORK/serve.log"; echo "FAIL: the server exited"; exit 1; }
  sleep 1
done
[ "$code" = 200 ] || { cat "$WORK/serve.log"; echo "FAIL: /health never answered 200"; exit 1; }
reply=$(curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What does len do?"}], "max_tokens": 8}')
echo "   $reply"
echo "$reply" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["object"] == "chat.completion" \
  and r["choices"][0]["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] >= 0, r'
grep -q "lmjax serve" "$WORK/serve.log"
echo "PASS: the image serves a chat completion"
