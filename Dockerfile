# The Meridian image: one image for `meridian node`, `meridian router` and the
# CLI (ENTRYPOINT ["meridian"]; the chart passes the subcommand and flags).
#   docker build -t <your-registry>/meridian:0.1.0 .
# Multi-stage: the builder makes a wheel and installs it with its
# dependencies into a virtualenv; the runtime stage gets only that
# virtualenv, on the slim Python base, and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# What the package is built from (pyproject's packages.find, its readme).
COPY pyproject.toml README.md ./
COPY ocidist ./ocidist
COPY proto ./proto
COPY cluster ./cluster
COPY node ./node
COPY localcluster ./localcluster
COPY loadtest ./loadtest
RUN python -m venv /opt/meridian \
 && /opt/meridian/bin/pip install --upgrade pip \
 && /opt/meridian/bin/pip wheel --no-deps -w /wheels . \
 && /opt/meridian/bin/pip install /wheels/*.whl \
 && /opt/meridian/bin/meridian --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="meridian" \
      org.opencontainers.image.description="Geo-replicated OCI container registry: node, router and CLI"
ENV PATH=/opt/meridian/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 meridian \
 && useradd --system --uid 10001 --gid meridian --home-dir /var/lib/meridian \
      --create-home --shell /usr/sbin/nologin meridian \
 && install -d -o meridian -g meridian /var/lib/meridian/data
COPY --from=build /opt/meridian /opt/meridian
USER 10001:10001
WORKDIR /var/lib/meridian
# The node's data dir (the chart mounts its volume here: --data /var/lib/meridian/data).
EXPOSE 5000 6000
ENTRYPOINT ["meridian"]
CMD ["--help"]
