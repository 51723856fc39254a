# lmjax in a container. The entrypoint is `lmjax`, so one image runs `serve`, `demo`, `train` and
# `data prepare`:
#
#   docker build -t lmjax:cpu .                                          # CPU (the default TARGET)
#   docker build -t lmjax:cuda --build-arg TARGET=cuda .                 # NVIDIA GPUs: jax[cuda12]
#   docker build -t lmjax:tpu --build-arg TARGET=tpu .                   # Cloud TPU VMs: jax[tpu]
#   docker build -t lmjax:sft --build-arg MODEL=runs/quickstart/sft .    # a trained run baked in
#   docker run -p 8000:8000 -v $PWD/runs/quickstart/sft:/runs/model -v $PWD/keys.toml:/etc/lmjax/keys.toml lmjax:cpu
#
# BASE is any Debian-based image with python3 (3.11 or newer) and its venv module; tools/container_smoke.sh
# builds on a root filesystem made by debootstrap, where no registry is reachable. Every Python package is
# installed under requirements.lock's constraints, as on a developer's machine.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TARGET=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/lmjax
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY lmjax ./lmjax
RUN /opt/lmjax/bin/pip install -q -c requirements.lock . \
 && case "$TARGET" in \
      cpu) ;; \
      cuda) /opt/lmjax/bin/pip install -q -c requirements.lock 'jax[cuda12]' ;; \
      tpu) /opt/lmjax/bin/pip install -q -c requirements.lock 'jax[tpu]' ;; \
      *) echo "TARGET must be cpu, cuda or tpu, not $TARGET" >&2; exit 1 ;; \
    esac

FROM ${BASE}
# A run directory to bake in at /runs/model (default: a placeholder saying to mount one there).
ARG MODEL=deploy/no-model
COPY --from=build /opt/lmjax /opt/lmjax
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin lmjax && mkdir -p /runs /etc/lmjax \
 && chown lmjax:lmjax /runs
COPY --chown=1000:1000 ${MODEL} /runs/model
USER 1000
WORKDIR /runs
# Caches (corpus, XLA) and huge pages for XLA's buffers (see the Makefile); the health URL is the server's.
ENV PATH=/opt/lmjax/bin:$PATH LMJAX_CACHE_DIR=/tmp/lmjax-cache GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
    LMJAX_HEALTH_URL=http://127.0.0.1:8000/health PYTHONUNBUFFERED=1
EXPOSE 8000 7860
# /health is 503 until the model has compiled: give it time before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen(os.environ['LMJAX_HEALTH_URL'], timeout=4)"
ENTRYPOINT ["lmjax"]
CMD ["serve", "--workdir", "/runs/model", "--host", "0.0.0.0", "--port", "8000", "--api-keys", "/etc/lmjax/keys.toml"]
