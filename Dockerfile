# rnnserve container images.
#   CPU (default):  docker build -t rnnserve .
#   CUDA:           docker build --build-arg FLAVOR=gpu -t rnnserve:gpu .
#   Training:       docker build --target train -t rnnserve:train .
# The install steps are `make install` itself, so the image and a developer's machine share
# one tested set of versions (constraints.txt) and one set of commands.
ARG FLAVOR=cpu

FROM python:3.11-slim AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-gpu
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv make \
    && rm -rf /var/lib/apt/lists/*

FROM base-${FLAVOR} AS build
ARG FLAVOR
WORKDIR /srv/rnnserve
COPY pyproject.toml setup.py MANIFEST.in constraints.txt README.md Makefile ./
COPY proto proto
COPY service service
COPY training training
RUN make install PYTHON=python3.11 ORT=${FLAVOR}

# Optional: retrain and re-export every model into /srv/rnnserve/exported.
FROM build AS train
RUN make install-test PYTHON=python3.11
COPY exported exported
CMD ["make", "train"]

FROM base-${FLAVOR} AS runtime
RUN useradd --system --uid 10001 --no-create-home rnnserve
WORKDIR /srv/rnnserve
COPY --from=build /srv/rnnserve /srv/rnnserve
# The committed models; mount another repository over this path to serve your own.
COPY exported /srv/rnnserve/exported
ENV PATH=/srv/rnnserve/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RNNSERVE_REPOSITORY=/srv/rnnserve/exported \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_GRPC_PORT=8500 \
    RNNSERVE_METRICS_PORT=8000 \
    RNNSERVE_DEVICE=auto \
    RNNSERVE_SHUTDOWN_GRACE=20
USER rnnserve
EXPOSE 8500 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["rnnserve", "health", "--address", "localhost:8500"]
# rnnserve handles SIGTERM itself: health NOT_SERVING, new work UNAVAILABLE, drain, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve", "serve"]
