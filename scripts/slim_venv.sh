#!/usr/bin/env bash
# Remove from a virtual environment what bids-siamese never loads at run time (the Docker image runs this after
# installing the dependencies): the packages' own test suites, torch's C++ headers (only for compiling
# extensions; the image has no compiler, so torch.compile falls back to eager there anyway) and torch's C++ test
# programs and protoc. torch_shm_manager (tensor sharing between DataLoader workers) stays. Shared libraries are
# stripped of their static symbol tables (`strip --strip-unneeded`: the dynamic symbols that loading and linking
# use stay; libtorch_cpu.so shrinks by about 90 MB) where binutils' strip is installed.
# The image build then runs scripts/check_install.py, and CI runs the image on the demo (scripts/ci/image.sh).
#   bash scripts/slim_venv.sh /opt/venv
set -euo pipefail
VENV="${1:?usage: slim_venv.sh VENV}"
site=$(echo "$VENV"/lib/python3*/site-packages)
[ -d "$site/torch" ] || { echo "slim_venv: no torch in $site; fix: pass the virtual environment's root" >&2; exit 66; }
before=$(du -sm "$VENV" | cut -f1)
# test suites: directories named tests/test that are packages' test code, never imported by the package itself
find "$site" -depth -type d \( -name tests -o -name test \) -path "$site/*/*" -exec rm -rf {} +
rm -rf "$site/torch/include"
find "$site/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
if command -v strip >/dev/null; then
    find "$VENV" -type f -name '*.so*' -exec strip --strip-unneeded {} + 2>/dev/null || true
else
    echo "slim_venv: strip not found (Debian: binutils): shared libraries keep their symbol tables"
fi
echo "slim_venv: $before MB -> $(du -sm "$VENV" | cut -f1) MB"
