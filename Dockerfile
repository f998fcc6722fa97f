# syntax=docker/dockerfile:1
# moe_engine on a CUDA PyTorch image, with DeepSpeed's launcher as the entry point.
#
#   docker build -t moe-engine .
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v "$PWD/runs:/workspace/moe_engine/runs" moe-engine
#
# runs the default job under ZeRO-2 on every GPU of the host; docs/launching.md has the rest
# (other configs, expert parallelism, several nodes, NCCL settings).
#
# Base image: PyTorch 2.11.0 for CUDA 13.0, the torch / CUDA / Triton 3.6 stack that the GPU tests
# and benchmarks of scripts/gpu_checks.sh run on. "devel" brings nvcc, which DeepSpeed needs to
# JIT-compile its CUDA ops (none are prebuilt). CUDA 13 needs an NVIDIA driver >= 580; for an older
# driver build with --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/moe_engine
COPY . .

# The README's and CI's own install script. MOE_ENGINE_SYSTEM_SITE_PACKAGES=1 makes ./.venv over the
# image's Python, so the image's CUDA torch (and its Triton) is used, never replaced by the CPU wheel
# the script installs on a machine without torch; the script fails if anything swapped it.
RUN --mount=type=cache,target=/root/.cache/pip \
    MOE_ENGINE_SYSTEM_SITE_PACKAGES=1 bash scripts/setup.sh \
    && .venv/bin/python -c "import torch; assert torch.version.cuda, f'torch {torch.__version__} is not a CUDA build'"

# deepspeed, torchrun, moe-engine and ninja (for DeepSpeed's JIT ops) come from the venv.
ENV PATH=/workspace/moe_engine/.venv/bin:${PATH}

# `docker run IMAGE [deepspeed arguments]`: without arguments, the default job on every visible GPU.
ENTRYPOINT ["deepspeed"]
CMD ["--module", "moe_engine.train", "--deepspeed_config", "configs/deepspeed_zero2.json"]
