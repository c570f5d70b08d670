"""Which groups each rollout step trained, and with which policy_version they were generated.

What it does: rank 0 appends one line per rollout step to `<run_dir>/trained_groups.jsonl`
({"step", "prompt_index": [...], "policy_version": [...]}, one entry per group), and a resumed
run drops the lines after the step it resumed from, as the metrics file does. It is the audit
trail of the data: every prompt trained once per epoch, how stale each group was (one-step
off-policy), what a resume re-generated. What it does not: store responses or scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_qae.persistence.metrics import truncate_jsonl_after
from rollout_sglang.types import RolloutBatch


class GroupLedger:
    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "trained_groups.jsonl"
        self.enabled = enabled

    def record(self, step: int, batch: RolloutBatch | None) -> None:
        if not self.enabled:
            return
        line = {"step": step, "prompt_index": [g.prompt.index for g in batch.groups],
                "policy_version": [g.samples[0].policy_version if g.samples else batch.policy_version
                                   for g in batch.groups]}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps > `step` (a resumed run trains them again)."""
        if self.enabled:
            truncate_jsonl_after(self.path, step)


def read_ledger(run_dir: str | Path) -> list[dict]:
    """Every line of a run's ledger, in order."""
    path = Path(run_dir) / "trained_groups.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
