# syntax=docker/dockerfile:1
# The mwmae image. One build argument, TARGET, picks the accelerator stack; each image carries
# what its hosts run and nothing they cannot use:
#   cpu   training and HEAR evaluation (JAX on CPU, torch CPU wheels, hear-validator,
#         hear-eval-kit), the demo and the tests: CI and local runs, no accelerator needed.
#   tpu   training with jax[tpu] (libtpu) on TPU VMs (launch/tpu_vm.sh). No torch: evaluation
#         runs elsewhere, and torch would only add gigabytes a TPU VM never uses.
#   cuda  training with jax[cuda12] on GPU hosts (launch/gpu_docker.sh) and evaluation through
#         PyTorch on the same GPU (torch's CUDA build; the HEAR module's backend is "torch" in
#         this image, MWMAE_TARGET=cuda), so one image serves a GPU job end to end and embedding
#         needs no JAX CUDA memory beside torch's.
#     docker build --build-arg TARGET=cpu  -t mwmae:cpu  .
#     docker build --build-arg TARGET=tpu  -t mwmae:tpu  .
#     docker build --build-arg TARGET=cuda -t mwmae:cuda .
# The extras each target installs are chosen in one place, the case block below. The CUDA
# libraries come as pip wheels; a GPU host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit. EXTRAS adds more extras of the package (comma-separated). TORCH_INDEX overrides where
# the cpu image finds torch's CPU build (its own index: PyPI's Linux torch is the CUDA build,
# gigabytes of CUDA libraries); "none" leaves pip's configured indexes alone, for a mirror that
# holds the CPU wheel. Without a Docker daemon: scripts/build_images.sh (buildah).
# The package is installed by scripts/install.sh, the same script CI runs (.ci/run ->
# scripts/test.sh -> scripts/install.sh), so the image and the tests install the same pins.
# Entry point: python -m mwmae.job, the training CLI (IMAGE --config ... --workdir ...), or with
# a command first another tool (IMAGE export|evaluate|finetune|sweep ...: jobs whose launcher
# passes only arguments); or --entrypoint python (-m mwmae.export, -m pytest, ...).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ---- build: a virtual environment in /opt/venv with the package (editable, from /src) ----
FROM base AS build
ARG TARGET=cpu
ARG EXTRAS=""
ARG TORCH_INDEX=""
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY scripts ./scripts
COPY mwmae ./mwmae
COPY tfrecord_tools ./tfrecord_tools
COPY hear_mwmae ./hear_mwmae
RUN case "$TARGET" in \
      cpu) extras="test,hear,demo"; torch_index="https://download.pytorch.org/whl/cpu" ;; \
      tpu) extras="test,tpu"; torch_index="" ;; \
      cuda) extras="train,test,cuda,hear-torch"; torch_index="" ;; \
      *) echo "TARGET must be cpu, tpu or cuda (got '$TARGET')" >&2; exit 1 ;; \
    esac; \
    torch_index="${TORCH_INDEX:-$torch_index}"; \
    if [ -n "$torch_index" ] && [ "$torch_index" != none ]; then \
      export PIP_EXTRA_INDEX_URL="$torch_index"; \
    fi; \
    PYTHON=python3 scripts/install.sh /opt/venv "${extras}${EXTRAS:+,$EXTRAS}"
# The cuda image evaluates through PyTorch on the GPU. A CPU torch would build and then fail only
# on a GPU host: an index or find-links folder holding torch+cpu wins over PyPI's CUDA build,
# since pip ranks a local version label (+cpu) above the plain version.
RUN if [ "$TARGET" = cuda ]; then \
      /opt/venv/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is None and \
        f"cuda image: torch {torch.__version__} is a CPU build; drop the index holding it")'; \
    fi

# ---- runtime: the venv and the source, run as an unprivileged user ----
FROM base AS runtime
ARG TARGET=cpu
LABEL org.opencontainers.image.title="mwmae" \
      org.opencontainers.image.description="MW-MAE audio pretraining in JAX (${TARGET} build)"
RUN useradd --create-home --uid 1000 --shell /bin/bash mwmae
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=mwmae:mwmae /src /src
COPY --chown=mwmae:mwmae configs /src/configs
COPY --chown=mwmae:mwmae tests /src/tests
COPY --chown=mwmae:mwmae benchmarks /src/benchmarks
ENV PATH=/opt/venv/bin:$PATH \
    MWMAE_TARGET=${TARGET}
USER 1000:1000
WORKDIR /src
ENTRYPOINT ["python", "-m", "mwmae.job"]
CMD ["--helpshort"]
