# NVIDIA's tritonserver container plus this project: the edit pipeline its Python backend
# models run (edit_pipeline/), the supervisor that starts tritonserver (serving/), and what
# the ONNX export and the TensorRT engine build need, so that engines are built with the
# same TensorRT as the server that loads them.
#
#   docker build -t triton-image-edit .
#   docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -e IMAGE_EDIT_ADMIN_KEY=... \
#       -v "$PWD/build/repository/instruct-pix2pix-tensorrt:/models" triton-image-edit
#
# The entry point is the project's supervisor (serving.serve), which starts
# tritonserver with the project's flags: it replaces model processes that die, and on
# SIGTERM drains edits in flight before tritonserver stops (bare tritonserver refuses the
# edits' BLS calls as soon as SIGTERM arrives).
#
# Not built or run by this project's CI: its machines have no Docker engine, no access to
# nvcr.io and no GPU (docs/gpu.md).

# 25.01 and later ship Python 3.12 (Ubuntu 24.04). The 24.xx containers have Python 3.10,
# too old for the diffusers, transformers and torch versions pinned in constraints.txt.
ARG TRITON_TAG=25.01-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}

# The container's Python is the system one, which PEP 668 marks as externally managed;
# the Python backend stub runs that interpreter, so the packages must go there.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/triton-image-edit
COPY pyproject.toml constraints.txt ./
COPY client/ client/
COPY export/ export/
COPY edit_pipeline/ edit_pipeline/
COPY model_repository/ model_repository/
COPY serving/ serving/

# The project and its dependencies as pyproject.toml lists them, at the versions of
# constraints.txt (the ones the tests ran with); the `gpu` extra instead of `standalone`:
# this container has its own tritonserver and runs onnxruntime on the GPU. On Linux,
# torch from PyPI is a CUDA build.
RUN pip install -c constraints.txt ./client ".[gpu]"

# TensorRT's Python package at the version of the container's own libnvinfer: an engine
# only loads in the TensorRT version that built it.
RUN trt_version="$(find /usr -name 'libnvinfer.so.*.*.*' 2>/dev/null \
        | sed -E 's/.*libnvinfer\.so\.//' | sort -V | tail -n 1)" \
 && test -n "$trt_version" \
 && pip install "tensorrt==${trt_version}.*"

CMD ["python3", "-m", "serving.serve", "--repository", "/models", "--host", "0.0.0.0"]
