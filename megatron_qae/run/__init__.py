"""The training run: the RL loop, the train step, micro-batching, the rollout handle, metrics,
console output and checkpoints."""
