#!/usr/bin/env bash
# Qwen2.5-32B DAPO + QAE on H100 nodes: run this same script on every node.
#
# Environment (all but the first four have defaults):
#   NNODES          total nodes (trainer + engine nodes)                         e.g. 8
#   NODE_RANK       this node's rank, 0..NNODES-1 (node 0 is the Ray head and trainer rank 0)
#   MASTER_ADDR     address of node 0, reachable from every node
#   MODEL_DIR       Hugging Face Qwen2.5-32B directory (config.json, tokenizer, safetensors)
#   TRAINER_NODES   nodes running torchrun (the rest only join Ray and host engines); default NNODES/2
#   GPUS_PER_NODE   default 8
#   MASTER_PORT     torchrun rendezvous port, default 29500
#   RAY_PORT        Ray head port, default 6379
#   DATA_DIR        directory with dapo-math-17k.parquet and aime-2024.parquet, default ./data
#   RUN_DIR         run directory (checkpoints, metrics), default runs/qwen2.5-32b-qae
#   CONFIG          default configs/qwen2.5_32b_qae.yaml
#   EXTRA_ARGS      extra key=value overrides appended to the training command
#
# Trainer nodes run torchrun; engine nodes only join the Ray cluster: the rollout manager (a Ray
# actor started by trainer rank 0) places SGLang engines on their GPUs. Colocated engines
# (TRAINER_NODES=NNODES, EXTRA_ARGS="engine.colocate=true engine.num_engines=..."): every node
# trains, and each engine is pinned to the node and GPUs of its trainer ranks. The script stops the Ray
# processes it started (ray stop on this node) when training ends; it never kills by name.
set -euo pipefail

: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${MODEL_DIR:?set MODEL_DIR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TRAINER_NODES="${TRAINER_NODES:-$((NNODES / 2))}"
MASTER_PORT="${MASTER_PORT:-29500}"
RAY_PORT="${RAY_PORT:-6379}"
DATA_DIR="${DATA_DIR:-data}"
RUN_DIR="${RUN_DIR:-runs/qwen2.5-32b-qae}"
CONFIG="${CONFIG:-configs/qwen2.5_32b_qae.yaml}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if [ "$NODE_RANK" -eq 0 ]; then
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of key=value words
  python -m megatron_qae.plan --config "$CONFIG" --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
    --trainer-gpus "$((TRAINER_NODES * GPUS_PER_NODE))" model.path="$MODEL_DIR" $EXTRA_ARGS
  # The trainer's GPUs are used by torchrun, not by Ray: advertise only engine nodes' GPUs.
  ray start --head --port "$RAY_PORT" --num-gpus 0 --disable-usage-stats
else
  if [ "$NODE_RANK" -lt "$TRAINER_NODES" ]; then
    ray start --address "$MASTER_ADDR:$RAY_PORT" --num-gpus 0 --disable-usage-stats
  else
    ray start --address "$MASTER_ADDR:$RAY_PORT" --num-gpus "$GPUS_PER_NODE" --disable-usage-stats --block
    exit 0
  fi
fi
trap 'ray stop' EXIT

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of key=value words
torchrun --nnodes "$TRAINER_NODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_qae.train --config "$CONFIG" \
  model.path="$MODEL_DIR" run.run_dir="$RUN_DIR" ray.address="$MASTER_ADDR:$RAY_PORT" \
  data.train_path="$DATA_DIR/dapo-math-17k.parquet" data.val_path="$DATA_DIR/aime-2024.parquet" \
  $EXTRA_ARGS
