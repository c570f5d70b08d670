# megatron-qae on H100 nodes: SGLang's own image (CUDA, Python 3.12, torch and transformers as
# the pinned SGLang requires them) + megatron-core, Transformer Engine, Ray and modelopt on top.
#
#   docker build -t megatron-qae .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 \
#       -v /data:/data -v $PWD/runs:/workspace/megatron-qae/runs megatron-qae \
#       python -m megatron_qae.plan --config configs/qwen2.5_32b_qae.yaml --nodes 8 --trainer-gpus 32
#
# The default command runs the multi-node launch script (set NNODES, NODE_RANK, MASTER_ADDR,
# MODEL_DIR, DATA_DIR, RAY_AUTH_TOKEN with -e); any other command replaces it.
#
# Why this base: sglang 0.5.23 pins torch==2.14.1 and transformers==5.19.0. A generic PyTorch
# image (NGC) pins its own torch build in /etc/pip/constraint.txt, and the two cannot be
# resolved together. So the SGLang image is the base, its torch / transformers / sglang are frozen
# as constraints, and everything else is installed against them: Transformer Engine's PyTorch
# extension is compiled with --no-build-isolation against the image's torch.
# tests/test_scale_files.py resolves these pins together with sglang's and megatron-core's own
# metadata (pip --dry-run), so a pin that cannot coexist fails the suite, not the build.
FROM lmsysorg/sglang:v0.5.23

# No CUDA_DEVICE_MAX_CONNECTIONS here: the launch script sets it for torchrun only (Megatron's
# TP overlap), and the engines must not inherit it (SGLang overlaps streams).
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

# The base's versions, read from the installed metadata (the image installs sglang editable, so
# `pip freeze` has no `sglang==` line); fails unless sglang is 0.5.23.
COPY tools/base_pins.py /tmp/base_pins.py
RUN python /tmp/base_pins.py 0.5.23 > /etc/megatron-qae-base-pins.txt

# Versions pinned here must satisfy pyproject.toml and resolve with the base image's pins
# (tests/test_scale_files.py checks both).
RUN pip install -c /etc/megatron-qae-base-pins.txt \
      "megatron-core==0.19.2" \
      "ray[default]==2.60.0" \
      "nvidia-modelopt==0.47.0"

# Transformer Engine: the core library wheel for the image's CUDA major, then the PyTorch
# extension built against the image's torch (no build isolation: an isolated build would fetch
# another torch and produce an extension that does not load).
RUN cuda_major=$(python -c 'import torch; print(torch.version.cuda.split(".")[0])') \
 && pip install -c /etc/megatron-qae-base-pins.txt "transformer-engine[core-cu${cuda_major}]==2.20.2" \
 && pip install -c /etc/megatron-qae-base-pins.txt --no-build-isolation "transformer-engine[pytorch]==2.20.2"

WORKDIR /workspace/megatron-qae
COPY pyproject.toml README.md ./
COPY megatron_qae ./megatron_qae
COPY rollout_sglang ./rollout_sglang
COPY tools ./tools
COPY configs ./configs
COPY examples ./examples
RUN pip install -c /etc/megatron-qae-base-pins.txt -e ".[gpu]" \
 && python -c 'import megatron.core, sglang, transformer_engine.pytorch, megatron_qae.run.loop'

CMD ["bash", "examples/run_qwen2.5_32b_qae.sh"]
