# One image for every gradwire role (PS, worker, `gradwire bytes`); only the command differs.
#
# Build with `docker compose build` after `scripts/bootstrap.sh` has filled ./wheelhouse: every
# wheel is installed offline from it (no registry or package index is needed at build time), and
# it reaches the build stages through a build-time bind mount, so it is in no layer of any stage.
# The final stage holds the base image, a non-root user and the runtime Python packages only:
#   /opt/venv      third-party dependencies (changes only when the wheelhouse changes)
#   /opt/gradwire  gradwire itself (the only layer a source change rebuilds: seconds)
#
# BASE_IMAGE is python:3.11-slim: the real one where a registry answers, otherwise the stand-in
# that scripts/bootstrap.sh builds under the same tag (Debian bookworm + python3 + venv).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels \
    PYTHONDONTWRITEBYTECODE=1
# What no gradwire role runs is dropped (C++ headers, test binaries, test suites: ~250 MB), then
# pip itself; a .pth file puts /opt/gradwire on the venv's path.
RUN --mount=type=bind,source=wheelhouse,target=/wheels \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet -r /wheels/requirements.txt -c /wheels/constraints.txt \
    && cd /opt/venv/lib/python3.*/site-packages \
    && rm -rf torch/include torch/test torch/bin/*Test torch/bin/test_* torch/bin/protoc* \
              torch/lib/libtorchbind_test.so \
    && find . -path ./torch -prune -o -depth -type d -name tests -exec rm -rf {} + \
    && /opt/venv/bin/python -m pip uninstall --quiet --yes pip \
    && echo /opt/gradwire > gradwire-app.pth \
    && /opt/venv/bin/python -c "import torch, numpy, scipy.stats, sklearn.datasets, grpc, \
grpc_health.v1.health, google.protobuf, constriction, rich, docker; assert torch.ones(3).sum() == 3"

FROM deps AS app
COPY pyproject.toml README.m[d] /src/
COPY proto /src/proto
COPY gradwire /src/gradwire
COPY compressors /src/compressors
COPY server /src/server
COPY worker /src/worker
# gradwire without its dependencies (the venv has them), built with setuptools from the wheelhouse
# by a throwaway pip; its console script is pointed at the runtime venv's Python.
RUN --mount=type=bind,source=wheelhouse,target=/wheels \
    { test -f /src/README.md || echo "# gradwire" > /src/README.md; } \
    && python3 -m venv /tmp/pip \
    && /tmp/pip/bin/pip install --quiet --no-deps --target /opt/gradwire /src \
    && sed -i '1s|^#!.*|#!/opt/venv/bin/python|' /opt/gradwire/bin/* \
    && /opt/venv/bin/python -m compileall -q /opt/gradwire >/dev/null \
    && PATH=/opt/gradwire/bin:$PATH gradwire --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="gradwire" \
      org.opencontainers.image.description="gRPC parameter server for communication-efficient distributed training"
RUN groupadd --system --gid 10001 gradwire \
    && useradd --system --uid 10001 --gid gradwire --create-home --home-dir /home/gradwire gradwire \
    && mkdir -p /runs && chown gradwire:gradwire /runs
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /opt/gradwire /opt/gradwire
COPY docker/entrypoint.sh /usr/local/bin/gradwire-entrypoint
ENV PATH=/opt/gradwire/bin:/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRADWIRE_OUT=/runs
WORKDIR /home/gradwire
# The entry point starts as root and runs gradwire as the `gradwire` user (setpriv), passing on
# CAP_NET_ADMIN only when the container has it (link shaping); see docker/entrypoint.sh.
ENTRYPOINT ["gradwire-entrypoint"]
CMD ["--help"]
