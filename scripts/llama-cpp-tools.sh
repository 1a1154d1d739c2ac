#!/usr/bin/env bash
# llama.cpp's own programs, the peers the issues name: llama-bench (decode/prefill), llama-server (-np parallel slots)
# and llama-perplexity, built once from the llama.cpp sources inside the pinned llama-cpp-python sdist for this CPU's
# instruction sets (AMX off), into ~/.cache/camelid/llama.cpp-VERSION-bin. bench/ finds them there.
#   scripts/llama-cpp-tools.sh PIP      (PIP: any pip, used only to download the sdist)
set -euo pipefail
PIP=$1
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
source "$(dirname "$0")/llama-cpp-args.sh"
ARGS=${LLAMA_CMAKE_ARGS:-$(native_args)}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/camelid
OUT=$CACHE/llama.cpp-$VERSION-bin
STAMP=$(printf %s "$ARGS" | sha256sum | cut -c1-12)
if [ -x "$OUT/llama-server" ] && [ "$(cat "$OUT/.args" 2>/dev/null)" = "$STAMP" ]; then exit 0; fi
echo "building llama.cpp's llama-bench, llama-server and llama-perplexity ($VERSION) once into $OUT; this takes minutes" >&2
WORK=$(mktemp -d "$CACHE/.tools.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PIP" download --quiet --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON $ARGS >/dev/null
cmake --build "$WORK/build" -j "$(nproc)" --target llama-bench llama-server llama-perplexity >/dev/null
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
cp "$WORK"/build/bin/llama-bench "$WORK"/build/bin/llama-server "$WORK"/build/bin/llama-perplexity "$OUT.tmp/"
echo "$STAMP" > "$OUT.tmp/.args"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"  # whole or not at all
