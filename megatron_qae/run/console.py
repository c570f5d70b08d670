"""What a user sees on the terminal: our progress and messages, not third-party dumps.

What it does: `setup(rank, verbose)` routes every log record and Python warning through the
root logger. The terminal shows records of our own packages (INFO on rank 0, WARNING on the
other ranks) and anything at ERROR or above; third-party INFO / WARNING records (megatron-core's
config dumps, deprecation notices and Apex / Transformer Engine fallback warnings, torch's
notices) go only to the run's log file, which `attach_run_dir` opens once the run directory is
known (records from before are kept and written first). `verbose=True` shows everything on the
terminal too. What it does not: metrics (metrics.py) or the progress bar (the loop's tqdm).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

OWN_PACKAGES = ("megatron_qae", "rollout_sglang", "tools", "examples", "benchmarks", "__main__")
"""Top-level logger names whose records the terminal always shows."""
_FORMAT = "%(asctime)s [rank{rank}] %(name)s: %(message)s"


class _OursOrSevere(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN_PACKAGES


class _Held(logging.Handler):
    """Keeps records until the run's log file exists (bounded: a run writes it early)."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


def setup(rank: int, verbose: bool = False) -> None:
    """Call once at the entry point, before megatron-core or torch.distributed are imported."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(_FORMAT.format(rank=rank)))
    if not verbose:
        console.addFilter(_OursOrSevere())
    root.handlers = [console, _Held()]
    logging.captureWarnings(True)  # warnings.warn(...) becomes a py.warnings record
    # torch._logging gives some of its loggers (torch, torch.distributed, ...) stderr handlers
    # of their own and stops them propagating; route those through ours.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] == "torch":
            logger.handlers.clear()
            logger.propagate = True


def attach_run_dir(run_dir: str | Path, rank: int) -> Path:
    """Write every record (third-party ones included) to <run_dir>/logs/rank<r>.log from now
    on, starting with those held since `setup`. Returns the file's path."""
    path = Path(run_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank)))
    root = logging.getLogger()
    for held in [h for h in root.handlers if isinstance(h, _Held)]:
        for record in held.records:
            handler.handle(record)
        root.removeHandler(held)
    root.addHandler(handler)
    return path
