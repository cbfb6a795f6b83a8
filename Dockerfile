# proxy_app production image.
#
# Two stages on the same Python base: "builder" installs the pinned runtime
# requirements into a virtualenv from prebuilt wheels, "runtime" holds only that
# virtualenv and the application package. No compilers, pip caches, tests or dev
# requirements reach the runtime stage; .dockerignore keeps everything else out
# of the build context.
#
# The base is pinned by tag and by the digest of its multi-architecture index
# (linux/amd64 + linux/arm64). Refresh both together, e.g. with
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# and keep the Python minor version (3.11) unchanged unless the project moves.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${BASE_IMAGE} AS builder

# Plain PyPI only: no pip configuration from the build host or the base image,
# no cache, no version check; wheels only, so the builder needs no compiler.
ENV PIP_CONFIG_FILE=/dev/null \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all: \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv

# Dependency layer: rebuilt only when requirements.txt changes.
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/python -m pip install --no-compile --requirement /tmp/requirements.txt \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools wheel \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib


FROM ${BASE_IMAGE} AS runtime

# Fixed, non-root identity; no home directory and no login shell. The base's own
# installer tooling (pip, setuptools, wheel) is not needed at run time: remove it
# so it is neither an attack surface nor a source of scanner findings.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && if python3 -m pip --version >/dev/null 2>&1; then \
         python3 -m pip uninstall --yes --root-user-action=ignore pip setuptools wheel; \
       fi \
    && rm -rf /root/.cache

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    PORT=3000

WORKDIR /app

# Application layer: the only layer rebuilt when just the code changes. Files
# stay owned by root, so the service cannot modify its own code; byte code is
# compiled here because the root filesystem may be mounted read-only.
COPY proxy_app/ /app/proxy_app/
RUN python -m compileall -q /app/proxy_app

# Build metadata last, so a new commit does not invalidate the layers above.
ARG GIT_SHA=dev
ARG VERSION=0.0.0+dev
ARG SOURCE_URL=https://github.com/OWNER/REPO
ENV GIT_SHA=${GIT_SHA}
LABEL org.opencontainers.image.title="proxy_app" \
      org.opencontainers.image.description="Caching API gateway: API keys, per-key rate limits and a Redis cache in front of one upstream HTTP API" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.version="${VERSION}"

USER 10001:10001

EXPOSE 3000

# Liveness without curl: a tiny standard-library request to /health/live.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; u = 'http://127.0.0.1:%s/health/live' % os.environ.get('PORT', '3000'); sys.exit(0 if r.urlopen(u, timeout=3).status == 200 else 1)"]

STOPSIGNAL SIGTERM

CMD ["python", "-m", "proxy_app"]
