# rnnserve container images. Build with BuildKit (`make docker`, `make docker-gpu`), which builds
# only the stages the target needs:
#   CPU (the default target):  DOCKER_BUILDKIT=1 docker build -t rnnserve .
#   CUDA 13 + cuDNN 9:         DOCKER_BUILDKIT=1 docker build --target gpu -t rnnserve:gpu .
#   Training:                  DOCKER_BUILDKIT=1 docker build --target train -t rnnserve:train .
# Behind a private package index or a TLS-inspecting proxy, pass either or both BuildKit
# secrets; they are mounted only while pip runs and never land in a layer or the history:
#   --secret id=pipconf,src=$HOME/.config/pip/pip.conf   (index-url, extra-index-url, credentials)
#   --secret id=pipca,src=/path/to/ca-bundle.pem         (the CAs pip should trust)
# Every stage installs the tested set of versions (constraints.txt), as `make install` does.
ARG PYTHON_IMAGE=python:3.11-slim

# The wheel, built from a clean copy of the sources (its gRPC code generated from proto/), and
# a virtual environment with it and its dependencies, non-editable, without pip.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY deploy/docker/with-pip-secrets /usr/local/bin/
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md constraints.txt ./
COPY proto proto
COPY service service
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=pipca \
    python3.11 -m venv /opt/build \
    && with-pip-secrets /opt/build/bin/pip install --quiet -c constraints.txt pip \
    && with-pip-secrets /opt/build/bin/pip wheel --quiet --no-deps --wheel-dir /wheels .

FROM build AS venv-cpu
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=pipca \
    python3.11 -m venv --without-pip /opt/rnnserve \
    && with-pip-secrets /opt/build/bin/pip --python /opt/rnnserve/bin/python install --quiet \
       --no-warn-script-location -c constraints.txt "$(ls /wheels/rnnserve-*.whl)[cpu]"

# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9; its cuda and cudnn extras bring those
# libraries as nvidia-* wheels (pinned in constraints.txt), so no CUDA base image is needed:
# the host's NVIDIA container toolkit supplies only the driver (libcuda.so).
FROM build AS venv-gpu
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=pipca \
    python3.11 -m venv --without-pip /opt/rnnserve \
    && with-pip-secrets /opt/build/bin/pip --python /opt/rnnserve/bin/python install --quiet \
       --no-warn-script-location -c constraints.txt "$(ls /wheels/rnnserve-*.whl)[gpu]"

# Optional: retrain and re-export every model into /src/exported (TensorFlow; not for serving).
FROM build AS train
COPY training training
COPY exported exported
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=pipca \
    with-pip-secrets /opt/build/bin/pip install --quiet -c constraints.txt \
       "$(ls /wheels/rnnserve-*.whl)[cpu,training]"
ENV PATH=/opt/build/bin:$PATH
CMD ["python", "-m", "training", "train", "--task", "all", "--out", "exported"]

# What both serving images share: the user, the environment, the probe and the entry point.
FROM ${PYTHON_IMAGE} AS serving
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/rnnserve \
        --shell /usr/sbin/nologin rnnserve \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/rnnserve
# /var/lib/rnnserve: where a volume for the SQLite state store goes
# (-v rnnserve-state:/var/lib/rnnserve -e RNNSERVE_STATE_STORE=sqlite:///var/lib/rnnserve/sessions.db);
# a new named volume takes this directory's owner, so the server may write there.
# The committed models; mount another repository over this path to serve your own.
COPY exported /srv/rnnserve/exported
# XDG_CACHE_HOME: ONNX Runtime keeps a file there, and /tmp is the one path that must stay
# writable (a tmpfs under --read-only). The drain (RNNSERVE_SHUTDOWN_GRACE) fits in docker
# stop's default 10 s with room for the processes to exit; give a longer grace a longer
# --stop-timeout.
ENV PATH=/opt/rnnserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/rnnserve \
    XDG_CACHE_HOME=/tmp/.cache \
    RNNSERVE_REPOSITORY=/srv/rnnserve/exported \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_GRPC_PORT=8500 \
    RNNSERVE_METRICS_PORT=8000 \
    RNNSERVE_HTTP_PORT=8080 \
    RNNSERVE_DEVICE=auto \
    RNNSERVE_SHUTDOWN_GRACE=7
USER 10001:10001
WORKDIR /home/rnnserve
EXPOSE 8500 8080 8000
# `rnnserve health` reads the server's own RNNSERVE_GRPC_PORT and TLS settings.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["rnnserve", "health"]
# rnnserve is a correct PID 1 (no --init needed): it reaps orphans and handles SIGTERM itself:
# health NOT_SERVING, new work UNAVAILABLE, drain, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve", "serve"]

FROM serving AS gpu
COPY --from=venv-gpu /opt/rnnserve /opt/rnnserve

# The default target: the CPU image.
FROM serving AS cpu
COPY --from=venv-cpu /opt/rnnserve /opt/rnnserve
