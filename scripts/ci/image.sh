#!/usr/bin/env bash
# Build the Docker image from ./Dockerfile with buildah (no Docker daemon needed: chroot isolation, overlay storage
# where the kernel allows it, else vfs; as root) and run it on the tiny demo (tests/test_image.py, pytest marker `image`). CI's image step (.ci/run).
#
#   bash scripts/ci/image.sh          # all: tools, build, the image tests, then remove the buildah storage
#   bash scripts/ci/image.sh build    # build (or rebuild from the layer cache) and keep the storage
#   bash scripts/ci/image.sh test     # the image tests against the image built before
#   bash scripts/ci/image.sh clean    # remove the buildah storage (images, layers, the base stand-in)
#
# The base: the Dockerfile's digest-pinned debian:bookworm-slim when it can be pulled; else (Docker Hub
# unreachable, as on our CI machine) a stand-in of bookworm built from Debian's archive with mmdebstrap, passed
# as --build-arg BASE_IMAGE. pip inside the build sees this machine's pip configuration only (`pip config list`,
# written to one pip.conf, with the files and folders it names bind-mounted read-only): no index is hard-coded.
#   BIDS_SIAMESE_IMAGE_STORE   buildah's storage (default /var/tmp/bids-siamese-image; removed by `all`/`clean`)
#   BIDS_SIAMESE_IMAGE         the image name (default localhost/bids/siamese:<version>)
#   BIDS_SIAMESE_IMAGE_DRIVER  buildah's storage driver (default: overlay where it can be mounted, else vfs)
set -euo pipefail
cd "$(dirname "$0")/../.."
STORE="${BIDS_SIAMESE_IMAGE_STORE:-/var/tmp/bids-siamese-image}"
IMAGE="${BIDS_SIAMESE_IMAGE:-localhost/bids/siamese:$(cat version)}"
STANDIN=localhost/bids-siamese/debian-standin:bookworm
BASE_IMAGE="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)"

overlay_works() {  # can this kernel mount overlayfs on the storage's file system? (not inside another overlay)
    local probe
    probe="$(mktemp -d "$STORE/overlay-probe.XXXXXX")" || return 1
    mkdir -p "$probe"/{lower,upper,work,merged}
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
            "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"; rm -rf "$probe"; return 0
    fi
    rm -rf "$probe"; return 1
}
# overlay: a layer costs only its changes (a source edit rebuilds in seconds); vfs copies the whole file system per
# layer and works everywhere. BIDS_SIAMESE_IMAGE_DRIVER overrides; an existing storage keeps its driver.
mkdir -p "$STORE"
if [ -z "${BIDS_SIAMESE_IMAGE_DRIVER:-}" ]; then
    if [ -f "$STORE/driver" ]; then BIDS_SIAMESE_IMAGE_DRIVER="$(cat "$STORE/driver")"
    elif overlay_works; then BIDS_SIAMESE_IMAGE_DRIVER=overlay
    else BIDS_SIAMESE_IMAGE_DRIVER=vfs; fi
fi
echo "$BIDS_SIAMESE_IMAGE_DRIVER" > "$STORE/driver"
export BIDS_SIAMESE_IMAGE="$IMAGE" BIDS_SIAMESE_IMAGE_STORE="$STORE" BIDS_SIAMESE_IMAGE_DRIVER
bah() { buildah --root "$STORE/root" --runroot "$STORE/run" --storage-driver "$BIDS_SIAMESE_IMAGE_DRIVER" "$@"; }

tools() {
    command -v buildah >/dev/null && command -v mmdebstrap >/dev/null && return 0
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        buildah mmdebstrap >/dev/null
}

base_args() {  # prints the --build-arg for the base: none when the pinned base is there or can be pulled
    if bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 || timeout 120 \
            buildah --root "$STORE/root" --runroot "$STORE/run" --storage-driver "$BIDS_SIAMESE_IMAGE_DRIVER" \
            pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    if ! bah inspect --type image "$STANDIN" >/dev/null 2>&1; then
        echo "image: $BASE_IMAGE cannot be pulled; building a stand-in of Debian bookworm with mmdebstrap" >&2
        local tar="$STORE/standin.tar" ctr
        mmdebstrap --quiet --variant=minbase --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$tar" >&2
        ctr=$(bah from scratch)
        bah add "$ctr" "$tar" / >/dev/null
        bah config --cmd bash "$ctr"
        bah commit -q "$ctr" "$STANDIN" >/dev/null
        bah rm "$ctr" >/dev/null
        rm -f "$tar"
    fi
    echo "--build-arg=BASE_IMAGE=$STANDIN"
}

pip_mounts() {  # this machine's pip configuration as one pip.conf, plus the paths it names, as buildah -v options
    # (mounted under /run/host-pip, so that they never cover the image's own files, e.g. its CA bundle)
    local conf="$STORE/pip.conf" key value token path mapped python=python3
    [ -x .venv/bin/python ] && python=.venv/bin/python  # CI's venv: Debian's python3 may lack pip
    echo "[global]" > "$conf"
    echo "-v=$conf:/etc/pip.conf:ro"
    "$python" -m pip config list 2>/dev/null | while IFS= read -r line; do
        key="${line%%=*}"; key="${key#*.}"; value="${line#*=}"; value="${value#\'}"; value="${value%\'}"
        mapped=""
        for token in $value; do
            path="${token#file://}"
            case "$path" in
                /*) if [ "$path" != "$token" ]; then mapped="$mapped file:///run/host-pip$path"; path="$(dirname "$path")"
                    else mapped="$mapped /run/host-pip$path"; fi  # a file:// index: mount its root (links go ../../files)
                    [ -e "$path" ] && echo "-v=$path:/run/host-pip$path:ro" ;;
                *) mapped="$mapped $token" ;;
            esac
        done
        echo "$key = ${mapped# }" >> "$conf"
    done | sort -u
    awk '!seen[$1]++' "$conf" > "$conf.tmp" && mv "$conf.tmp" "$conf"  # the first value of a key wins, as in pip
}

build() {
    mkdir -p "$STORE"
    local args=() start torch_index=() mounts
    mapfile -t mounts < <(pip_mounts)
    mapfile -t args < <(base_args)
    # the PyTorch CPU index (the Dockerfile's default for the torch wheel) where it is reachable; else only the
    # machine's configured indexes
    timeout 20 python3 -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=15)" \
        >/dev/null 2>&1 || torch_index=(--build-arg=TORCH_INDEX_URL=)
    start=$(date +%s)
    bah bud --isolation chroot --layers --format docker --network host "${mounts[@]}" "${args[@]}" "${torch_index[@]}" \
        --build-arg "VERSION=$(cat version)" -t "$IMAGE" .
    echo "image: built $IMAGE in $(( $(date +%s) - start )) s; $(bah images --format '{{.Size}}' "$IMAGE")"
}

run_tests() {
    local python=python3
    [ -x .venv/bin/python ] && python=.venv/bin/python
    "$python" -m pytest -q -p no:cacheprovider -m image tests/test_image.py
}

clean() {
    [ -d "$STORE" ] || return 0
    bah rm --all >/dev/null 2>&1 || true
    bah rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$STORE"
}

case "${1:-all}" in
    all)
        start=$(date +%s)
        tools
        trap 'clean; echo "image: step finished in $(( $(date +%s) - start )) s"' EXIT
        build
        run_tests ;;
    build) tools && build ;;
    test) run_tests ;;
    clean) clean ;;
    *) echo "image.sh: unknown command '$1'; fix: use all, build, test or clean" >&2; exit 64 ;;
esac
