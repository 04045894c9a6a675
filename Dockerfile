# syntax=docker/dockerfile:1
# The mwmae image. One build argument picks the accelerator stack:
#   docker build --build-arg TARGET=cpu  -t mwmae:cpu  .   (CI, local runs)
#   docker build --build-arg TARGET=tpu  -t mwmae:tpu  .   (jax[tpu]: TPU VMs, launch/tpu_vm.sh)
#   docker build --build-arg TARGET=cuda -t mwmae:cuda .   (jax[cuda12]: GPU hosts, launch/gpu_docker.sh)
# The CUDA libraries come as pip wheels with jax[cuda12]; a GPU host needs only the NVIDIA driver
# and the NVIDIA Container Toolkit. EXTRAS adds more extras of the package (comma-separated).
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
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY scripts ./scripts
COPY mwmae ./mwmae
COPY tfrecord_tools ./tfrecord_tools
COPY hear_mwmae ./hear_mwmae
RUN case "$TARGET" in \
      cpu) extras="test,hear,demo" ;; \
      tpu) extras="test,tpu" ;; \
      cuda) extras="test,cuda,hear" ;; \
      *) echo "TARGET must be cpu, tpu or cuda (got '$TARGET')" >&2; exit 1 ;; \
    esac; \
    PYTHON=python3 scripts/install.sh /opt/venv "${extras}${EXTRAS:+,$EXTRAS}"

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
