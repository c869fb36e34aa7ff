#!/usr/bin/env bash
# Install the course into a Python environment — the one recipe used by `make` (.venv), the
# Docker images and CI: torch first at the course's pin, then llmlab with torch held fixed,
# then the Jupyter kernel. nbgrader's lab and server extensions come enabled with nbgrader.
#
#   PYTHON=.venv/bin/python docker/install-course.sh             # laptop / CI (CPU torch)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 ...       # a CUDA build for GPU images
#   EDITABLE=0 EXTRAS=course docker/install-course.sh            # images: a regular install
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

"$PYTHON" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$PYTHON" -m pip install --quiet --disable-pip-version-check ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"
if [ "$EDITABLE" = 1 ]; then target=(-e ".[${EXTRAS}]"); else target=(".[${EXTRAS}]"); fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -c "$pin" "${target[@]}"
"$PYTHON" - <<PY
import torch
version = torch.__version__.split("+")[0]
assert version == "${TORCH_VERSION}", f"torch {torch.__version__} installed, the course pins ${TORCH_VERSION}"
print(f"llmlab installed with torch {torch.__version__} (cuda: {torch.version.cuda})")
PY
"$PYTHON" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llmlab)" >/dev/null
