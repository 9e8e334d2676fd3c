# bids-siamese BIDS App image (CPU by default). Build from the repository root:
#   docker build --build-arg VERSION="$(cat version)" -t "bids/siamese:$(cat version)" .
# CUDA variant (one build-arg: the PyTorch wheel index of the CUDA build):
#   docker build --build-arg VERSION="$(cat version)" \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t "bids/siamese:$(cat version)-cuda" .
# The install step is scripts/install.sh with the hash-checked lock, the same one CI runs; the build-time checks
# are scripts/check_install.py, which CI runs too (tests/test_container.py).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG VERSION=""
# 1: prefetch the TemplateFlow files into /opt/templateflow (needs the network at build time); 0: use the
# copies bundled with the package
ARG PREFETCH_TEMPLATEFLOW=1
ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow
RUN python -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
WORKDIR /src
COPY . /src
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [ -n "$VERSION" ] && [ "$VERSION" != "$(cat version)" ]; then \
        echo "--build-arg VERSION=$VERSION differs from the version file ($(cat version))" >&2; exit 1; fi \
    && TORCH_INDEX_URL="$TORCH_INDEX_URL" TORCH_VERSION="$TORCH_VERSION" PIP="python -m pip" bash scripts/install.sh \
    && install -m 0755 run.py "$VIRTUAL_ENV/bin/run.py" \
    && mkdir -p "$TEMPLATEFLOW_HOME" \
    && if [ "$PREFETCH_TEMPLATEFLOW" = 1 ]; then python scripts/prefetch_templates.py; fi
# Templates, surfaces, atlases, deepbet's weights, the validator: fail the build if anything is missing,
# so nothing is ever downloaded at run time.
RUN python scripts/check_install.py

FROM python:${PYTHON_VERSION}-slim
ARG VERSION=""
LABEL org.opencontainers.image.title="bids-siamese" \
      org.opencontainers.image.description="BIDS App: 3D Siamese networks for brain MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-apps/bids-siamese" \
      org.opencontainers.image.licenses="Apache-2.0"
# BIDS_SIAMESE_CONTAINER: GeneratedBy.Container in dataset_description.json (the version is the package's)
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    BIDS_SIAMESE_CONTAINER="docker://bids/siamese"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/templateflow /opt/templateflow
RUN groupadd --gid 1000 siamese && useradd --create-home --home-dir /home/siamese --uid 1000 --gid 1000 siamese
ENV HOME=/home/siamese
USER 1000:1000
WORKDIR /home/siamese
RUN bids-siamese --version
ENTRYPOINT ["run.py"]
