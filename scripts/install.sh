#!/usr/bin/env bash
# Install bids-siamese with its dependencies. The same script is used by .ci/run and the Dockerfile,
# so the image and CI install exactly the same way.
#
#   bash scripts/install.sh            # the app
#   bash scripts/install.sh test       # the app and the test tools
#
# Where: the active virtual environment ($VIRTUAL_ENV), else ./.venv (created here; a system Python with
# PEP 668 refuses pip install), or the pip given as $PIP (the Dockerfile passes its venv's).
# What: torch first, pinned, so that pip never resolves an open range to the multi-GB CUDA build, then every
# other dependency from the hash-checked lock (requirements/lock.txt, or lock-test.txt with "test";
# refresh with scripts/lock.sh), then this package without dependencies.
#   TORCH_VERSION       (default 2.13.0)
#   TORCH_INDEX_URL     (default: the configured index; the Docker CPU image uses the PyTorch CPU index,
#                        a CUDA image passes a CUDA index instead)
#   TORCH_REQUIREMENTS  a hash-pinned torch requirements file (requirements/torch-cpu.txt, torch-cuda.txt):
#                        torch is then installed with the lock in ONE --require-hashes call (TORCH_INDEX_URL
#                        becomes an extra index), so torch and every dependency are hash-checked (the images)
#   INSTALL_PACKAGE     0: only the dependencies (the Docker image installs them before copying the source,
#                        so that a source edit does not reinstall them)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
case "$EXTRAS" in
    "") LOCK=requirements/lock.txt ;;
    test) LOCK=requirements/lock-test.txt ;;
    *) echo "install.sh: unknown extra '$EXTRAS'; fix: use no argument or 'test'" >&2; exit 64 ;;
esac
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ -z "${PIP:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    else
        VENV="${BIDS_SIAMESE_VENV:-.venv}"
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        PYTHON="$VENV/bin/python"
    fi
    PIP="$PYTHON -m pip"
    echo "install.sh: installing into $($PYTHON -c 'import sys; print(sys.prefix)')"
fi
if [ -n "${TORCH_REQUIREMENTS:-}" ]; then
    grep -q "^torch==${TORCH_VERSION}" "$TORCH_REQUIREMENTS" || {
        echo "install.sh: $TORCH_REQUIREMENTS does not pin torch ${TORCH_VERSION}; fix: run scripts/lock.sh" >&2; exit 65; }
    extra=()
    [ -z "${TORCH_INDEX_URL:-}" ] || extra=(--extra-index-url "${TORCH_INDEX_URL}")
    $PIP install --no-cache-dir --require-hashes --no-deps "${extra[@]}" -r "$TORCH_REQUIREMENTS" -r "$LOCK"
else
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        $PIP install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
    else
        $PIP install --no-cache-dir "torch==${TORCH_VERSION}"
    fi
    $PIP install --no-cache-dir --require-hashes --no-deps -r "$LOCK"
fi
if [ "${INSTALL_PACKAGE:-1}" != 0 ]; then
    $PIP install --no-cache-dir --no-deps --no-build-isolation .
fi
$PIP check
