# megatron-qae on H100 nodes: NGC PyTorch (CUDA 13, Python 3.12) + the pinned GPU stack.
#
#   docker build -t megatron-qae .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 \
#       -v /data:/data -v $PWD/runs:/workspace/megatron-qae/runs megatron-qae \
#       python -m megatron_qae.plan --config configs/qwen2.5_32b_qae.yaml --nodes 8 --trainer-gpus 32
#
# The default command runs the multi-node launch script (set NNODES, NODE_RANK, MASTER_ADDR,
# MODEL_DIR, DATA_DIR with -e); any other command replaces it.
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

# Versions pinned here must satisfy pyproject.toml (tests/test_scale_files.py checks it).
RUN pip install \
      "megatron-core==0.19.2" \
      "transformer-engine[pytorch]==2.20.2" \
      "sglang==0.5.23" \
      "ray[default]==2.60.0" \
      "nvidia-modelopt==0.47.0"

WORKDIR /workspace/megatron-qae
COPY pyproject.toml README.md ./
COPY megatron_qae ./megatron_qae
COPY rollout_sglang ./rollout_sglang
COPY tools ./tools
COPY configs ./configs
COPY examples ./examples
RUN pip install -e ".[gpu]"

CMD ["bash", "examples/run_qwen2.5_32b_qae.sh"]
