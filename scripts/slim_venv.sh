#!/usr/bin/env bash
# Remove from a virtual environment what bids-siamese never loads at run time (the Docker image runs this after
# installing the dependencies): the packages' own test suites, torch's C++ headers (only for compiling
# extensions; the image has no compiler, so torch.compile falls back to eager there anyway) and torch's C++ test
# programs and protoc. torch_shm_manager (tensor sharing between DataLoader workers) stays. torch's shared
# libraries are stripped of their static symbol tables (`strip --strip-unneeded`: the dynamic symbols that loading and linking
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
    # torch's own libraries only: stripping the auditwheel-patched libraries of other wheels (numpy's OpenBLAS)
    # breaks them (measured: numpy's C extensions failed to import)
    find "$site/torch/lib" -maxdepth 1 -type f \( -name 'libtorch*.so' -o -name 'libc10.so' \) \
        -exec strip --strip-unneeded {} +
else
    echo "slim_venv: strip not found (Debian: binutils): shared libraries keep their symbol tables"
fi
echo "slim_venv: $before MB -> $(du -sm "$VENV" | cut -f1) MB"
