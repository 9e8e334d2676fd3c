# bids-siamese BIDS App image (CPU by default). Build from the repository root (VERSION must equal the version
# file: the build refuses anything else, so the image's version label always comes from that file):
#   docker build --build-arg VERSION="$(cat version)" -t "bids/siamese:$(cat version)" .
# CUDA variant (torch from PyPI, the CUDA build, hash-pinned in requirements/torch-cuda.txt):
#   docker build --build-arg VERSION="$(cat version)" --build-arg TORCH_VARIANT=cuda --build-arg TORCH_INDEX_URL= \
#       -t "bids/siamese:$(cat version)-cuda" .
# Without a Docker daemon, CI builds and runs this file with buildah: scripts/ci/image.sh (docs/hpc.md).
# Layers: the base and the dependencies (torch and the hash-checked lock) come before the source is copied, so a
# source edit rebuilds only the last two steps. The build-time checks are scripts/check_install.py, which CI
# runs too (tests/test_container.py).
#
# The base is pinned by digest. Refresh (docs/hpc.md, "Refreshing the base image"):
#   skopeo inspect --format '{{.Digest}}' docker://docker.io/library/debian:bookworm-slim
# and replace the digest below. Where Docker Hub is unreachable (CI here), scripts/ci/image.sh builds a stand-in
# of bookworm from Debian's archive (mmdebstrap) and passes it as --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:88200866dfff7ea7f5cbcb6ec7c8a701889efe6fe859fe64d6990e4b07ea4171

FROM ${BASE_IMAGE} AS base
# Debian's own Python (bookworm: 3.11, the version the lock files are resolved for). Package versions follow
# bookworm's security updates, so they are not pinned here (the base digest pins the rest).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'

FROM base AS deps
# cpu: requirements/torch-cpu.txt (from the PyTorch CPU index); cuda: requirements/torch-cuda.txt (PyPI)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv binutils \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && python3 -m venv "$VIRTUAL_ENV"
WORKDIR /src
COPY requirements/lock.txt "requirements/torch-${TORCH_VARIANT}.txt" /src/requirements/
COPY scripts/install.sh scripts/slim_venv.sh /src/scripts/
# Every wheel is hash-checked (torch too); then what the app never loads leaves the venv and the shared libraries
# lose their symbol tables (scripts/slim_venv.sh; binutils' strip stays in this stage).
RUN TORCH_REQUIREMENTS="requirements/torch-${TORCH_VARIANT}.txt" TORCH_INDEX_URL="$TORCH_INDEX_URL" \
        TORCH_VERSION="$TORCH_VERSION" INSTALL_PACKAGE=0 PIP="$VIRTUAL_ENV/bin/python -m pip" bash scripts/install.sh \
    && bash scripts/slim_venv.sh "$VIRTUAL_ENV"

FROM base
ARG VERSION=""
# 1: download the TemplateFlow files into /opt/templateflow (needs TemplateFlow's server at build time; fails
# with one line when it is unreachable); 0 (default, works offline): the copies bundled with the package are used
ARG PREFETCH_TEMPLATEFLOW=0
# BIDS_SIAMESE_CONTAINER: GeneratedBy.Container in dataset_description.json (the version is the package's).
# No MPLCONFIGDIR here: the app picks a per-user directory (bids_siamese/cli/main.py, user_cache_dirs).
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BIDS_SIAMESE_CONTAINER="docker://bids/siamese"
RUN groupadd --gid 1000 siamese && useradd --create-home --home-dir /home/siamese --uid 1000 --gid 1000 siamese
LABEL org.opencontainers.image.title="bids-siamese" \
      org.opencontainers.image.description="BIDS App: 3D Siamese networks for brain MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-apps/bids-siamese" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV HOME=/home/siamese
WORKDIR /home/siamese
COPY --from=deps /opt/venv /opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The source: only the package, its metadata and the scripts the build runs (.dockerignore keeps the rest out).
COPY . /tmp/src
# Templates, surfaces, atlases, deepbet's weights, the validator: fail the build if anything is missing,
# so nothing is ever downloaded at run time.
RUN if [ "$VERSION" != "$(cat /tmp/src/version)" ]; then \
        echo "build: --build-arg VERSION='$VERSION' is not the version file's $(cat /tmp/src/version); fix: build with --build-arg VERSION=\"\$(cat version)\"" >&2; \
        exit 1; fi \
    && python -m pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
    && install -m 0755 /tmp/src/run.py "$VIRTUAL_ENV/bin/run.py" \
    && mkdir -p "$TEMPLATEFLOW_HOME" \
    && if [ "$PREFETCH_TEMPLATEFLOW" = 1 ]; then python /tmp/src/scripts/prefetch_templates.py; \
       else echo "build: PREFETCH_TEMPLATEFLOW=0: the templates bundled with the package are used"; fi \
    && python /tmp/src/scripts/check_install.py \
    && bids-siamese --version \
    && rm -rf /tmp/src /root/.cache
USER 1000:1000
ENTRYPOINT ["run.py"]
