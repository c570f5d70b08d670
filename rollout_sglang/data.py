"""Prompt data: parquet (DAPO-Math-17k / verl schema) or jsonl, tokenized with the chat
template, and a resumable cursor that walks it in a seeded per-epoch order.

What it does: reads rows, takes the prompt (a list of chat messages or a plain string) and the
ground-truth answer (a dotted path into the row, e.g. reward_model.ground_truth), applies the
tokenizer's chat template with the generation prompt, drops prompts longer than the limit
(counted and logged; an error when none is left). What it does not: generate or score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from rollout_sglang.types import Prompt

log = logging.getLogger(__name__)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .parquet or .jsonl file as dicts."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; set data.train_path / data.val_path")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{i + 1}: not valid JSON ({exc})") from exc
        return rows
    raise ValueError(f"data file {str(path)!r}: use .parquet or .jsonl")


def _dig(row: dict[str, Any], dotted: str, where: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"{where}: no key {dotted!r} (at {part!r}; available: {keys}); "
                           "set data.prompt_key / data.answer_key")
        value = value[part]
    return value


def load_prompts(path: str | Path, tokenizer, prompt_key: str = "prompt",
                 answer_key: str = "reward_model.ground_truth", apply_chat_template: bool = True,
                 max_prompt_tokens: int | None = None) -> list[Prompt]:
    """Tokenized prompts of a data file, in file order."""
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    prompts, too_long = [], 0
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        raw = _dig(row, prompt_key, where)
        messages = raw if isinstance(raw, list) else [{"role": "user", "content": str(raw)}]
        if apply_chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer("".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        text = messages[-1]["content"] if messages else ""
        prompts.append(Prompt(i, tuple(int(t) for t in ids), str(_dig(row, answer_key, where)), text))
    if too_long:
        log.warning("%s: dropped %d of %d prompts longer than %s tokens", path, too_long, len(rows),
                    max_prompt_tokens)
    if not prompts:
        raise ValueError(f"{path}: every prompt is longer than rollout.max_prompt_tokens={max_prompt_tokens}")
    return prompts


class PromptCursor:
    """Walks a prompt list epoch by epoch in a seeded order; exact resume via state_dict."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next_indices(self, n: int) -> list[int]:
        """The next `n` prompt indices, crossing epoch boundaries."""
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            take = min(n - len(out), self.size - self.position)
            out.extend(self._order[self.position: self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint cursor is over {state['size']} prompts but the data set has "
                             f"{self.size}; resume with the same data.train_path")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._order_of(self.epoch)
