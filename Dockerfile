# tensorcache image: `make image` (docker or podman), or
#   docker build -t tensorcache:0.1.0 .
# Stage 1 builds the wheels (tensorcache and its dependencies) and installs
# them into a virtualenv; stage 2 is a slim Python with that virtualenv only:
# no pip, no compilers, no source tree. Runs as uid 10001 (Kubernetes'
# restricted profile: runAsNonRoot), with a read-only root filesystem.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# What the wheel is built from (tests/integration/test_k8s_manifests.py
# builds a wheel from exactly these paths).
COPY pyproject.toml README.md ./
COPY tensorcache/ tensorcache/
COPY proto/ proto/
COPY node/ node/
COPY router/ router/
COPY client/ client/
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -m venv /opt/tensorcache \
 && /opt/tensorcache/bin/pip install --no-cache-dir --no-index --find-links /wheels tensorcache \
 && /opt/tensorcache/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
# The base image's own pip goes too: nothing in the final stage can install.
RUN python -m pip uninstall --yes pip setuptools wheel || true \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tensorcache
COPY --from=build /opt/tensorcache /opt/tensorcache
ENV PATH=/opt/tensorcache/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    MALLOC_ARENA_MAX=4
USER 10001:10001
# router 7070, node 7071 (gRPC) and 7072 (data channel), health 8081 (k8s/).
EXPOSE 7070 7071 7072 8081
ENTRYPOINT ["tensorcache"]
CMD ["--help"]
