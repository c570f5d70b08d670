"""The frozen reference policy of the KL penalty: the initial policy's weights, same layout.

What it does: builds a second set of this rank's model chunks with the policy's
TransformerConfig (same TP / PP / VPP layout, same layer spec), copies the policy's freshly
built weights into it, and, when the run starts from an HF checkpoint, loads those weights,
so the reference is the initial policy even when the run resumes from a later checkpoint.
No DDP, no optimizer, no gradients: it only runs the forward-only log-prob pass
(train_step.compute_logprobs). What it does not: compute the KL (algorithm/kl_penalty.py) or
get saved in checkpoints (it is rebuilt from the same sources).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

from megatron_qae.model import build as model_lib
from megatron_qae.model import weights
from megatron_qae.model.parallel import ParallelGroups
from megatron_qae.model.policy import Policy


@dataclass
class Reference:
    """Everything one rank holds of the reference policy."""

    chunks: list[torch.nn.Module]
    """GPTModel chunks (in Float16Module with bf16), parameters frozen."""
    config: TransformerConfig
    """The policy's TransformerConfig (the schedule reads it)."""
    hf_config: dict[str, Any]
    groups: ParallelGroups


def build_reference(policy: Policy, transformer_impl: str, hf_dir: str | Path | None) -> Reference:
    """The reference for `policy`; call right after `build_policy`, before any checkpoint is
    loaded. `hf_dir`: the HF weights the run starts from (model.load_weights), else None."""
    config = policy.config
    # The weights are copied in below: skip the random init (it would also advance the RNG
    # state the rest of the run draws from).
    keep, config.perform_initialization = config.perform_initialization, False
    try:
        chunks = model_lib.build_model_chunks(policy.hf_config, config, transformer_impl)
    finally:
        config.perform_initialization = keep
    with torch.no_grad():
        for ours, theirs in zip(chunks, policy.chunks):
            weights.unwrap(ours).load_state_dict(weights.unwrap(theirs).state_dict())
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    reference = Reference(chunks, config, policy.hf_config, policy.groups)
    if hf_dir is not None:
        weights.load_hf_dir_into(chunks, policy.hf_config, policy.groups, hf_dir)
    return reference
