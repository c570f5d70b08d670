"""Pushing the trainer's weights to the rollout engines (over a process group, or colocated)."""
