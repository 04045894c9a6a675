# mwmae image. One build arg picks the accelerator stack:
#   docker build --build-arg TARGET=cpu  -t mwmae:cpu .
#   docker build --build-arg TARGET=tpu  -t mwmae:tpu .    (jax[tpu], for TPU VMs)
#   docker build --build-arg TARGET=cuda -t mwmae:cuda .   (jax[cuda12], for GPU hosts)
# The package is installed by scripts/install.sh, the same script CI runs.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TARGET=cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY mwmae ./mwmae
COPY tfrecord_tools ./tfrecord_tools
RUN extras=test; \
    if [ "$TARGET" = tpu ]; then extras=test,tpu; elif [ "$TARGET" = cuda ]; then extras=test,cuda; \
    elif [ "$TARGET" != cpu ]; then echo "TARGET must be cpu, tpu or cuda" >&2; exit 1; fi; \
    PYTHON=python3 scripts/install.sh /opt/venv "$extras"

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 1000 mwmae
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=mwmae /src /src
COPY --chown=mwmae configs /src/configs
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER mwmae
WORKDIR /src
ENTRYPOINT ["python", "-m", "mwmae.train"]
