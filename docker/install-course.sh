#!/usr/bin/env bash
# Install the course into a Python environment — the one recipe used by `make` (.venv), the
# Docker images and CI: torch first at the course's pin (pip, so the machine's pip settings and
# TORCH_INDEX choose the build), then llmlab with torch held fixed (uv, which installs the ~170
# packages in parallel; pip if uv cannot), then the Jupyter kernel. nbgrader's lab and server
# extensions come enabled with nbgrader. Then the bytecode, on every core, in one pass: it must be
# there before the first import, since a process that may not write it (PYTHONDONTWRITEBYTECODE,
# the read-only grading sandbox) compiles every module it imports from source at every start.
# Test suites and the ~550 model families of transformers the course never loads are left out:
# they are a third of the bytecode and no course process imports them.
#
#   PYTHON=.venv/bin/python docker/install-course.sh             # laptop / CI (CPU torch)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 ...       # a CUDA build for GPU images
#   EDITABLE=0 EXTRAS=course docker/install-course.sh            # a regular install
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0                 # keep in step with environment.yml and pyproject [tool.llmlab]
PYTHON=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-}         # empty: the default index
EXTRAS=${EXTRAS:-course,test}
EDITABLE=${EDITABLE:-1}

pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==${TORCH_VERSION}" > "$pin"

pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile)  # compiled below
"${pip[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"
"${pip[@]}" uv
if [ "$EDITABLE" = 1 ]; then target=(-e ".[${EXTRAS}]"); else target=(".[${EXTRAS}]"); fi
if ! "$PYTHON" -m uv pip install --quiet --python "$PYTHON" -c "$pin" "${target[@]}"; then
  echo "install-course: uv could not install the course; trying pip" >&2
  "${pip[@]}" --upgrade pip
  "${pip[@]}" -c "$pin" "${target[@]}"
fi
# left out: test suites, torch's test helpers but the few torch imports itself (one holds Python 3.12
# syntax), and the model families the course never loads (transformers imports a few for its mappings)
helpers='__init__|common_dtype|logging_tensor|distributed/__init__|distributed/fake_pg'
models='auto|llama|bert|gpt2|mixtral|qwen2|qwen3_5|gemma|t5|bloom|align|encoder_decoder'
skip="/tests?/|/torch/testing/_internal/(?!(${helpers})\.py$)|/transformers/models/(?!(${models})/)[^/]+/"
site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -m compileall -q -j 0 -x "$skip" "$site" >/dev/null
if [ "$EDITABLE" = 1 ]; then "$PYTHON" -m compileall -q -j 0 lib >/dev/null; fi  # an editable install's own source
"$PYTHON" - <<PY
import torch
version = torch.__version__.split("+")[0]
assert version == "${TORCH_VERSION}", f"torch {torch.__version__} installed, the course pins ${TORCH_VERSION}"
print(f"llmlab installed with torch {torch.__version__} (cuda: {torch.version.cuda})")
PY
"$PYTHON" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llmlab)" >/dev/null
