#!/usr/bin/env bash
# Install llama-cpp-python (the llama.cpp peer) into a virtual environment from a wheel built once and cached.
#   scripts/llama-cpp-peer.sh PIP FLAVOUR [EXTRA]
# FLAVOUR portable: a build for any x86-64 CPU (no AVX or later: the interop tests' peer, slow but runs anywhere);
# FLAVOUR native: this CPU's own instruction sets without AMX, as `make bench` measures it (override with
# LLAMA_CMAKE_ARGS).
# The wheel lands in $CAMELID_WHEELS (default ~/.cache/camelid/wheels/FLAVOUR), so a fresh clone or a new .venv
# reuses it: the first build compiles llama.cpp (about 10 minutes on 2 cores), later installs take seconds.
set -euo pipefail
PIP=$1 FLAVOUR=$2 EXTRA=${3:-}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
source "$(dirname "$0")/llama-cpp-args.sh"  # native_args: this CPU's instruction sets
case $FLAVOUR in
  portable) ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF \
-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF" ;;
  native) ARGS=${LLAMA_CMAKE_ARGS:-$(native_args)} ;;
  *) echo "llama-cpp-peer: FLAVOUR must be portable or native, got $FLAVOUR" >&2; exit 2 ;;
esac
DIR=${CAMELID_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/camelid/wheels}/$FLAVOUR-$VERSION-$(printf %s "$ARGS" | sha256sum | cut -c1-12)
if ! ls "$DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION ($FLAVOUR) once into $DIR; this compiles llama.cpp and takes minutes" >&2
  TMP=$(mktemp -d "${DIR%/*}/.build.XXXXXX" 2>/dev/null || { mkdir -p "${DIR%/*}"; mktemp -d "${DIR%/*}/.build.XXXXXX"; })
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PIP" wheel --quiet --no-deps --no-cache-dir -w "$TMP" "llama-cpp-python==$VERSION"
  rm -rf "$DIR" && mv "$TMP" "$DIR"  # whole or not at all: an interrupted build leaves no half wheel behind
fi
WHEEL=$(ls "$DIR"/llama_cpp_python-*.whl)
"$PIP" install --quiet --force-reinstall --no-deps "$WHEEL"  # this build, whichever was installed before
"$PIP" install --quiet "$WHEEL${EXTRA:+[$EXTRA]}"  # its dependencies (numpy, diskcache, jinja2; the server's with EXTRA=server)
# llama.cpp's own Python converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages) from the same
# sdist, for the tests that check camelid against llama.cpp's GGUF output (Llama 4): unpacked once beside the wheels
TREE=${DIR%/*}/../llama.cpp-$VERSION
if [ ! -f "$TREE/convert_hf_to_gguf.py" ]; then
  SDIST=$(mktemp -d)
  "$PIP" download --quiet --no-deps --no-binary :all: -d "$SDIST" "llama-cpp-python==$VERSION"
  tar -xzf "$SDIST"/llama_cpp_python-*.tar.gz -C "$SDIST"
  SRC=$(echo "$SDIST"/llama_cpp_python-*/vendor/llama.cpp)
  rm -rf "$TREE.tmp" && mkdir -p "$TREE.tmp"
  cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/gguf-py" "$TREE.tmp/"
  [ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$TREE.tmp/"
  rm -rf "$TREE" && mv "$TREE.tmp" "$TREE" && rm -rf "$SDIST"
fi
