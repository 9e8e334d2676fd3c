#!/usr/bin/env bash
# Install bids-siamese with its dependencies. The same script is used by .ci/run and the Dockerfile,
# so the image and CI install exactly the same way.
#
#   bash scripts/install.sh            # the app
#   bash scripts/install.sh test       # the app and the test tools
#
# torch is installed first, pinned, so that pip never resolves an open range to the multi-GB CUDA build:
#   TORCH_VERSION     (default 2.13.0)
#   TORCH_INDEX_URL   (default: the configured index; the Docker CPU image uses the PyTorch CPU index,
#                      a CUDA image passes a CUDA index instead)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PIP="${PIP:-python3 -m pip}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    $PIP install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
else
    $PIP install --no-cache-dir "torch==${TORCH_VERSION}"
fi
# brainspace is only read for its bundled fsLR 32k (conte69) surface files; its hard dependency on VTK
# (~640 MB) is never imported, so it is installed without dependencies.
$PIP install --no-cache-dir --no-deps "brainspace>=0.1.10"
if [ -n "$EXTRAS" ]; then
    $PIP install --no-cache-dir ".[${EXTRAS}]"
else
    $PIP install --no-cache-dir .
fi
