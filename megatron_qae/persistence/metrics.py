"""The one sink for flat {"ns/name": float} metric dicts: jsonl always, TensorBoard and W&B
when configured. Rank 0 only writes; other ranks get a sink that drops everything.

What it does not: compute metrics (each step returns its own) or aggregate across ranks.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsSink:
    """Writes one json line per `log` call to `<run_dir>/metrics.jsonl`, plus TB / W&B."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError(
                    f"run.wandb_project={wandb_project!r} but wandb is not installed; "
                    "pip install wandb or set run.wandb_project=null"
                ) from exc
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps > `step` (a resumed run rewrites them)."""
        if self.enabled:
            truncate_jsonl_after(self.path, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop the lines of a per-step jsonl file (a "step" key each) whose step is > `step`."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """All metric lines of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def gradient_token_share(rows: list[dict[str, float]]) -> float:
    """A run's share of generated response tokens that carried a policy gradient: the sum of
    `perf/gradient_tokens` over the sum of `perf/generated_tokens` (what dynamic sampling
    dropped, zero advantages and the skip all leave out); nan before any step logged them."""
    generated = sum(r.get("perf/generated_tokens", 0.0) for r in rows)
    return sum(r.get("perf/gradient_tokens", 0.0) for r in rows) / generated if generated else float("nan")
