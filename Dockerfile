# syntax=docker/dockerfile:1
# oauth-gateway: slim, non-root, read-only-root friendly. No compiler in the final image.
#   docker build -t oauth-gateway:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e GATEWAY_REDIS_URL=redis://host:6379/0 oauth-gateway:0.1.0

ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: the project's wheel and every dependency's, built where a compiler exists ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# only for dependencies without a binary wheel on this platform
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels .

# -- final: a virtual environment installed from those wheels only ------------------------
FROM ${PYTHON_IMAGE}
ARG UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9090 \
    GATEWAY_POLICIES=/etc/oauth-gateway/policies
RUN groupadd --system --gid ${UID} gateway \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin gateway
# the wheels are mounted for this step only, so they add nothing to the image; bytecode is
# compiled now because the root filesystem is read-only at run time
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links=/wheels oauth-gateway \
 && /opt/venv/bin/pip uninstall --yes pip \
 && python -m compileall -q /opt/venv
COPY --chown=root:root --chmod=0644 policies/*.yaml /etc/oauth-gateway/policies/
USER ${UID}:${UID}
WORKDIR /tmp
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["oauth-gateway"]
CMD ["serve"]
