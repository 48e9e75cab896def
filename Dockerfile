# syntax=docker/dockerfile:1
#
# Images of the service, built from one Dockerfile with two targets:
#
#   docker build --target gateway -t imgserve-gateway:0.1.0 .   # REST (gunicorn) + gRPC gateway
#   docker build --target trainer -t imgserve-trainer:0.1.0 .   # python -m training (train, calibrate)
#
# The gateway target starts gunicorn (HTTP :8080, /metrics on the same port). The gRPC
# server is the same image with another command (`python -m serving.api.grpc`,
# :9000, its own /metrics on :9001); Kubernetes runs the two as two containers of one
# pod (see k8s/base/gateway.yaml), so each has its own probes, restarts and logs.
#
# Checked by hadolint in `make lint` and tests/deploy; built only where a Docker
# engine exists (see k8s/README.md).

# Pinned slim base; replace the tag by its digest (python:3.11.13-slim-bookworm@sha256:...)
# in a registry you control for fully reproducible builds.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------
# deps: the pinned runtime dependency closure in a virtual environment. Only the two
# dependency files are copied, so this (large, slow) layer is rebuilt when the pins
# change, not when the source does.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY requirements.lock pyproject.toml ./
# Runtime dependencies are pyproject's [project.dependencies]; requirements.lock pins
# them and their transitive closure (it also pins the dev tools, which stay out).
RUN python -m venv /opt/venv \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('runtime.txt', 'w').write('\n'.join(deps) + '\n')" \
 && /opt/venv/bin/pip install --no-cache-dir --constraint requirements.lock --requirement runtime.txt

# ---------------------------------------------------------------------------------------
# runtime: the dependencies plus the source, an unprivileged user, nothing else.
FROM ${PYTHON_IMAGE} AS runtime
# MALLOC_ARENA_MAX=2: glibc arenas held 2.9-3.4 GB after image floods, 1.25 GB with 2.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MALLOC_ARENA_MAX=2 \
    HOME=/tmp
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# the shared model volume is group-owned by this gid (fsGroup 10001 in k8s/).
RUN groupadd --system --gid 10001 imgserve \
 && useradd --system --uid 10001 --gid imgserve --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin imgserve
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY contract/ contract/
COPY training/ training/
COPY calibration/ calibration/
COPY serving/ serving/
# Byte-compile at build time: the root filesystem is read-only at run time.
RUN python -m compileall -q contract training calibration serving

# ---------------------------------------------------------------------------------------
# gateway: gunicorn serving serving.app:create_app() on :8080.
FROM runtime AS gateway
ENV IMGSERVE_MODEL_BASE=/models \
    IMGSERVE_BIND=0.0.0.0:8080 \
    IMGSERVE_GRPC_BIND=0.0.0.0:9000 \
    IMGSERVE_GRPC_METRICS_BIND=0.0.0.0:9001 \
    PROMETHEUS_MULTIPROC_DIR=/run/imgserve/metrics
# The multiprocess metrics directory must exist and be writable before gunicorn forks;
# in Kubernetes an emptyDir is mounted over it (read-only root filesystem).
RUN mkdir -p /run/imgserve/metrics /models \
 && chown imgserve:imgserve /run/imgserve/metrics
USER 10001:10001
EXPOSE 8080 9000 9001
ENTRYPOINT ["gunicorn", "-c", "serving/gunicorn.conf.py", "serving.app:create_app()"]

# ---------------------------------------------------------------------------------------
# trainer: python -m training classifier|detector|calibrate|rollback ...
FROM runtime AS trainer
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]
