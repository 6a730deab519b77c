# megalm for GPU clusters: official PyTorch CUDA image + megalm with pinned dependencies, run as a non-root user.
#
#   docker build -t megalm:latest .
#   apptainer build megalm.sif docker-daemon://megalm:latest     # or: enroot import dockerd://megalm:latest
#
# Nothing secret goes in: no tokens, keys or data. Mount data and run dirs at run time (docs/cluster.md).
# The pins below are the versions megalm is tested with; tests/launch/test_dockerfile.py checks that they
# satisfy setup.cfg's ranges. torch comes from the base image (its tag names the version).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0

# Open MPI for `mpirun` launches (mpi4py's wheel links against it); ninja for DeepSpeed's JIT-built ops.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev ninja-build \
 && rm -rf /var/lib/apt/lists/*

RUN python -m pip install \
      "deepspeed==0.19.8" \
      "sentencepiece==0.2.3" \
      "numpy==2.4.6" \
      "mpi4py==4.1.2" \
      "tensorboard==2.21.0" \
      "pyyaml==6.0.3" \
      "transformers==5.24.0" \
      "safetensors==0.8.0" \
      "xxhash==4.1.0" \
      "tokenizers==0.23.3" \
      "protobuf==7.36.2"

RUN useradd --create-home --uid 1000 --shell /bin/bash megalm
WORKDIR /opt/megalm
COPY --chown=megalm:megalm . /opt/megalm
# --no-deps: everything above is pinned; pip must not swap the base image's torch.
RUN python -m pip install --no-deps /opt/megalm

USER megalm
ENV MEGALM_ROOT=/opt/megalm \
    TORCH_EXTENSIONS_DIR=/home/megalm/.cache/torch_extensions
CMD ["megalm", "--help"]
