#!/usr/bin/env bash
# Install the course into a Python environment — the one recipe used by `make` (.venv), the
# Docker images and CI: torch first at the course's pin (pip, so the machine's pip settings and
# TORCH_INDEX choose the build), then llmlab with torch held fixed (uv, which installs the ~170
# packages in parallel; pip if uv cannot), then the Jupyter kernel. nbgrader's lab and server
# extensions come enabled with nbgrader. Bytecode is compiled at install time, on every core (uv for
# what it installs, compileall for torch and an editable llmlab): it must be there before the first import, since a
# process that may not write it (PYTHONDONTWRITEBYTECODE, a read-only sandbox) compiles every
# module it imports from source at every start.
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

pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --no-compile ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"  # compiled below
"${pip[@]}" --no-compile uv
if [ "$EDITABLE" = 1 ]; then target=(-e ".[${EXTRAS}]"); else target=(".[${EXTRAS}]"); fi
uv=("$PYTHON" -m uv pip install --quiet --python "$PYTHON" --compile-bytecode)
if ! "${uv[@]}" -c "$pin" "${target[@]}"; then
  echo "install-course: uv could not install the course; trying pip" >&2
  "${pip[@]}" --upgrade pip
  "${pip[@]}" -c "$pin" "${target[@]}"  # pip compiles what it installs
fi
"$PYTHON" -m compileall -q -j 0 -x '/testing/_internal/' \
  "$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')" >/dev/null  # its test helpers hold Python 3.12 syntax
if [ "$EDITABLE" = 1 ]; then "$PYTHON" -m compileall -q -j 0 lib >/dev/null; fi  # an editable install's own source
"$PYTHON" - <<PY
import torch
version = torch.__version__.split("+")[0]
assert version == "${TORCH_VERSION}", f"torch {torch.__version__} installed, the course pins ${TORCH_VERSION}"
print(f"llmlab installed with torch {torch.__version__} (cuda: {torch.version.cuda})")
PY
"$PYTHON" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llmlab)" >/dev/null
