#!/usr/bin/env bash
# Wheels for a GPU machine without network whose python already has torch (CUDA 13), transformers,
# peft and accelerate, but not trl, datasets, bitsandbytes, unsloth or vllm (the lent H200's image).
# Run here, where pip reaches the registry; it fills .whl/<group>/ for Python 3.12 on x86-64 Linux.
# Each group stays under 64 MiB so it can travel in one call; install a group there with
#   scripts/gpu_install.sh .whl/<group>
# and then run `make gpu-check GPU_PYTHON=python3`. vLLM (~330 MB) does not fit: GRPO then
# generates with transformers, and the check says so.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fetch() {  # fetch GROUP NAME==VERSION...
  local group=$1; shift
  mkdir -p ".whl/$group"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d ".whl/$group" "$@"
}
# brandcopy's own needs beyond that image, and TRL with its datasets (jieba, for word-level ROUGE only, is not needed).
fetch base trl==1.15.0 datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18 openai==3.54.0 httpx2==2.16.2 \
  httpcore2 truststore pydantic pydantic-core jiter distro sniffio
fetch bnb bitsandbytes==0.50.2
fetch unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 tyro docstring-parser typeguard shtab msgspec json5 \
  nest-asyncio structlog hf_transfer cut_cross_entropy torchao diffusers certifi==2026.10.19.post1
du -sh .whl/* | sed 's/^/size: /'
