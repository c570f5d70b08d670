"""Typed records that cross the rollout -> trainer process boundary.

What it does: defines the plain dataclasses the rollout manager returns and the trainer
consumes. What it does not: no tensors, no torch import, no behaviour beyond cheap
derived properties, so Ray can pickle these cheaply and either side can import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prompt:
    """One prompt of the data set, already tokenized with the chat template applied."""

    index: int
    """Position of the prompt in its data set (stable across epochs and resumes)."""
    prompt_ids: tuple[int, ...]
    """Token ids of the prompt, chat template applied."""
    answer: str
    """Ground-truth answer the reward function checks against."""
    text: str = ""
    """The raw prompt text (for logs and reward functions that need it)."""
    data_source: str = "default"
    """The row's `data_source` (evaluation reports metrics per source); "default" when absent."""


@dataclass(frozen=True)
class Sample:
    """One response to one prompt, scored."""

    group_id: int
    """Id of the group (= prompt occurrence in this rollout step) the sample belongs to."""
    prompt_ids: tuple[int, ...]
    """Prompt token ids, shape [prompt_tokens]."""
    response_ids: tuple[int, ...]
    """Generated token ids, shape [response_tokens], stop token included when generated."""
    rollout_logprobs: tuple[float, ...]
    """Log-prob (nats) of each response token under the engine's policy, shape [response_tokens]."""
    finish_reason: str
    """'stop' (stop token or string), 'length' (max_new_tokens reached) or 'abort'."""
    reward: float
    """Shaped score the advantage is computed from (e.g. +1/-1 plus overlong penalty)."""
    accuracy: float
    """0/1 correctness before shaping (the dynamic-sampling filter and metrics use it)."""
    policy_version: int
    """Weights version of the engine that generated the sample."""
    pred: str | None = None
    """The answer the grader read from the response (maj@k votes on it); None when none."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class Group:
    """The n samples of one prompt in one rollout step."""

    group_id: int
    prompt: Prompt
    samples: tuple[Sample, ...]

    @property
    def accuracy_is_constant(self) -> bool:
        """True when every sample has the same accuracy (DAPO dynamic sampling drops these)."""
        return len({s.accuracy for s in self.samples}) <= 1


@dataclass
class RolloutBatch:
    """What one rollout step hands to the trainer."""

    groups: list[Group]
    """Kept groups, exactly `prompts_per_rollout_step` of them when dynamic sampling fills up."""
    policy_version: int
    """Version of the weights the engines held while generating."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Flat {"rollout/name": value} metrics of the step (generation batches, drops, tokens/s...)."""

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]


@dataclass(frozen=True)
class EnginePlacement:
    """Where a colocated engine must run: on the node and devices of its trainer ranks."""

    hostname: str
    """Host name of the trainer ranks' node (matched against Ray's node list)."""
    devices: tuple[str, ...] = ()
    """CUDA device UUIDs ("GPU-...") of those ranks, one per engine TP rank; empty on CPU."""
