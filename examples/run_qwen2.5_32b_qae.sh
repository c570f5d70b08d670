#!/usr/bin/env bash
# Qwen2.5-32B DAPO + QAE on H100 nodes: run this same script on every node.
#
# Environment (all but the first four have defaults):
#   NNODES          total nodes (trainer + engine nodes)                         e.g. 8
#   NODE_RANK       this node's rank, 0..NNODES-1 (node 0 is the Ray head and trainer rank 0)
#   MASTER_ADDR     address of node 0, reachable from every node
#   MODEL_DIR       Hugging Face Qwen2.5-32B directory (config.json, tokenizer, safetensors)
#   TRAINER_NODES   nodes running torchrun (the rest only join Ray and host engines); default NNODES/2,
#                   at least 1
#   GPUS_PER_NODE   default 8
#   TRAINER_GPUS_PER_NODE  GPUs of each trainer node torchrun uses (the first ones); the others
#                   host engines through Ray. Default GPUS_PER_NODE, or GPUS_PER_NODE/2 on one node
#                   (NNODES=1: trainer GPUs 0-3 + engine GPUs 4-7). Colocated engines share the
#                   trainer's GPUs: set it to GPUS_PER_NODE there.
#   MASTER_PORT     torchrun rendezvous port, default 29500
#   RAY_PORT        Ray head port, default 6379
#   RAY_WAIT_S      how long a worker node waits for the Ray head, default 600
#   DATA_DIR        directory with dapo-math-17k.parquet and aime-2024.parquet, default ./data
#   RUN_DIR         run directory (checkpoints, metrics), default runs/qwen2.5-32b-qae
#   CONFIG          default configs/qwen2.5_32b_qae.yaml
#   EXTRA_ARGS      extra key=value overrides appended to the training command
#
# Ray token authentication is always on here (RAY_AUTH_MODE=token): every node needs the same
# token, in RAY_AUTH_TOKEN or in the file RAY_AUTH_TOKEN_PATH names (make one with
# `ray get-auth-token --generate` and share it the way you share other secrets).
#
# Networking: set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the interface the nodes reach each
# other on (e.g. eth0) when a node has several, and NCCL_IB_HCA to the InfiniBand adapters to
# use (e.g. mlx5); NCCL picks them itself otherwise. CUDA_DEVICE_MAX_CONNECTIONS=1 is set for
# torchrun only: Megatron's tensor-parallel communication overlap with sequence parallel relies
# on kernels being issued in order on one hardware queue, while SGLang's engines (started by
# Ray, which inherits `ray start`'s environment) overlap streams and must not get it.
#
# One node (NNODES=1, not colocated): torchrun gets GPUs 0..TRAINER_GPUS_PER_NODE-1
# (CUDA_VISIBLE_DEVICES) and the Ray head is started with the other GPUs visible and counted
# (--num-gpus), so Ray hands exactly those to the engines (Ray maps its GPU slots through the
# CUDA_VISIBLE_DEVICES it was started with). The same split applies on every trainer node
# whenever TRAINER_GPUS_PER_NODE < GPUS_PER_NODE.
#
# Order of start-up: node 0 starts the Ray head, then runs the dry-run planner (so a layout that
# does not fit stops the run before any GPU is touched); every other node waits until the head
# answers before joining. Trainer nodes run torchrun; engine nodes only join the Ray cluster: the
# rollout manager (a Ray actor started by trainer rank 0) places SGLang engines on their GPUs.
# Colocated engines (TRAINER_NODES=NNODES, EXTRA_ARGS="engine.colocate=true engine.num_engines=..."):
# every node trains, and each engine is pinned to the node and GPUs of its trainer ranks. The
# script stops the Ray processes it started (ray stop on this node) when it ends; it never kills
# by name.
set -euo pipefail

: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${MODEL_DIR:?set MODEL_DIR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
half=$((NNODES / 2))
TRAINER_NODES="${TRAINER_NODES:-$((half > 0 ? half : 1))}"
if [ "$NNODES" -eq 1 ]; then
  TRAINER_GPUS_PER_NODE="${TRAINER_GPUS_PER_NODE:-$((GPUS_PER_NODE / 2))}"
else
  TRAINER_GPUS_PER_NODE="${TRAINER_GPUS_PER_NODE:-$GPUS_PER_NODE}"
fi
MASTER_PORT="${MASTER_PORT:-29500}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_WAIT_S="${RAY_WAIT_S:-600}"
DATA_DIR="${DATA_DIR:-data}"
RUN_DIR="${RUN_DIR:-runs/qwen2.5-32b-qae}"
CONFIG="${CONFIG:-configs/qwen2.5_32b_qae.yaml}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  echo "error: Ray token authentication is required for multi-node runs: set RAY_AUTH_TOKEN (or" \
       "RAY_AUTH_TOKEN_PATH) to the same token on every node; make one with" \
       "'ray get-auth-token --generate'" >&2
  exit 2
fi
if [ "$TRAINER_NODES" -lt 1 ] || [ "$TRAINER_NODES" -gt "$NNODES" ]; then
  echo "error: TRAINER_NODES=$TRAINER_NODES must be in 1..NNODES=$NNODES" >&2
  exit 2
fi
if [ "$TRAINER_GPUS_PER_NODE" -lt 1 ] || [ "$TRAINER_GPUS_PER_NODE" -gt "$GPUS_PER_NODE" ]; then
  echo "error: TRAINER_GPUS_PER_NODE=$TRAINER_GPUS_PER_NODE must be in 1..GPUS_PER_NODE=$GPUS_PER_NODE" >&2
  exit 2
fi
export RAY_AUTH_MODE=token
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
cd "$(dirname "$0")/.."
# A trainer node's GPU split: torchrun's first, Ray's (engines') the rest.
ENGINE_GPUS_HERE=$((GPUS_PER_NODE - TRAINER_GPUS_PER_NODE))
TRAINER_DEVICES=$(seq -s, 0 $((TRAINER_GPUS_PER_NODE - 1)))
ENGINE_DEVICES=$(seq -s, "$TRAINER_GPUS_PER_NODE" $((GPUS_PER_NODE - 1)))

# Ray on a trainer node: only the GPUs torchrun does not use, visible and counted.
start_ray_on_trainer_node() {
  if [ "$ENGINE_GPUS_HERE" -gt 0 ]; then
    CUDA_VISIBLE_DEVICES="$ENGINE_DEVICES" ray start "$@" --num-gpus "$ENGINE_GPUS_HERE" --disable-usage-stats
  else
    ray start "$@" --num-gpus 0 --disable-usage-stats
  fi
}

wait_for_ray_head() {
  local deadline=$((SECONDS + RAY_WAIT_S))
  until ray health-check --address "$MASTER_ADDR:$RAY_PORT" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: the Ray head at $MASTER_ADDR:$RAY_PORT did not answer within ${RAY_WAIT_S}s;" \
           "check that node 0 started and that MASTER_ADDR / RAY_PORT are right (or raise RAY_WAIT_S)" >&2
      exit 1
    fi
    sleep 5
  done
}

if [ "$NODE_RANK" -eq 0 ]; then
  # The trainer's GPUs are used by torchrun, not by Ray: Ray advertises only engine GPUs.
  start_ray_on_trainer_node --head --port "$RAY_PORT"
  trap 'ray stop' EXIT
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of key=value words
  python -m megatron_qae.plan --config "$CONFIG" --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
    --trainer-gpus "$((TRAINER_NODES * TRAINER_GPUS_PER_NODE))" model.path="$MODEL_DIR" $EXTRA_ARGS
else
  wait_for_ray_head
  if [ "$NODE_RANK" -lt "$TRAINER_NODES" ]; then
    start_ray_on_trainer_node --address "$MASTER_ADDR:$RAY_PORT"
    trap 'ray stop' EXIT
  else
    ray start --address "$MASTER_ADDR:$RAY_PORT" --num-gpus "$GPUS_PER_NODE" --disable-usage-stats --block
    exit 0
  fi
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of key=value words
CUDA_DEVICE_MAX_CONNECTIONS=1 CUDA_VISIBLE_DEVICES="$TRAINER_DEVICES" \
torchrun --nnodes "$TRAINER_NODES" --node-rank "$NODE_RANK" --nproc-per-node "$TRAINER_GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_qae.train --config "$CONFIG" \
  model.path="$MODEL_DIR" run.run_dir="$RUN_DIR" ray.address="$MASTER_ADDR:$RAY_PORT" \
  data.train_path="$DATA_DIR/dapo-math-17k.parquet" data.val_path="$DATA_DIR/aime-2024.parquet" \
  $EXTRA_ARGS
