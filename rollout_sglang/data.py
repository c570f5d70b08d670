"""Prompt data: parquet (DAPO-Math-17k / verl schema) or jsonl, tokenized with the chat
template, and a resumable cursor that walks it in a seeded per-epoch order.

What it does: reads rows in verl's schema as published (`prompt`: a list of chat messages or a
plain string; `reward_model`: {"ground_truth", "style"}; `data_source`, `extra_info` and any
other column are left alone), takes the ground-truth answer through a dotted path
(reward_model.ground_truth), applies the tokenizer's chat template with the generation
prompt, and drops prompts longer than the limit (counted and logged; an error when none is
left). Rows are kept as published, repeats included: the published DAPO-Math-17k parquet holds
its ~17k prompts about 100 times each (1.79M rows) and AIME-2024 its 30 problems 32 times, and
verl trains / evaluates on them that way. Parquet is read in record batches and only the two
columns used, and each distinct prompt is tokenized once and shared by its repeats, so the
published file loads in memory proportional to its distinct prompts. What it does not:
generate, score, or deduplicate.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rollout_sglang.types import Prompt

log = logging.getLogger(__name__)
_PARQUET_BATCH_ROWS = 8192


def iter_rows(path: str | Path, columns: list[str] | None = None,
              optional: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Rows of a .parquet or .jsonl file as dicts (parquet: only `columns`, when given, and
    those of `optional` the file has)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; set data.train_path / data.val_path")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(p)
        if columns is not None:
            names = f.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise KeyError(f"{p}: no column {missing} (available: {names}); "
                               "set data.prompt_key / data.answer_key")
            columns = columns + [c for c in optional if c in names and c not in columns]
        for batch in f.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()
    elif p.suffix in (".jsonl", ".json"):
        with p.open() as lines:
            for i, line in enumerate(lines):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{p}:{i + 1}: not valid JSON ({exc})") from exc
    else:
        raise ValueError(f"data file {str(path)!r}: use .parquet or .jsonl")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a .parquet or .jsonl file as a dict, all columns."""
    return list(iter_rows(path))


def _dig(row: dict[str, Any], dotted: str, where: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"{where}: no key {dotted!r} (at {part!r}; available: {keys}); "
                           "set data.prompt_key / data.answer_key")
        value = value[part]
    return value


def _messages(raw: Any, where: str) -> list[dict[str, Any]]:
    """Chat messages of a `prompt` cell: verl's list of {"role", "content"}, or a plain string."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if isinstance(raw, list) and raw and all(isinstance(m, dict) and "content" in m for m in raw):
        return raw
    raise ValueError(f"{where}: the prompt is {type(raw).__name__} {str(raw)[:80]!r}; expected a list of "
                     "chat messages ({'role', 'content'}) or a string; check data.prompt_key")


class _Tokenize:
    """Prompt token ids of chat messages, memoized: repeated prompts share one tuple."""

    def __init__(self, tokenizer, apply_chat_template: bool) -> None:
        self.tokenizer, self.apply_chat_template = tokenizer, apply_chat_template
        self.seen: dict[str, tuple[tuple[int, ...], str]] = {}

    def __call__(self, messages: list[dict[str, Any]]) -> tuple[tuple[int, ...], str]:
        key = json.dumps(messages, sort_keys=True)
        if key not in self.seen:
            if self.apply_chat_template:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            else:
                text = "".join(m["content"] for m in messages)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.seen[key] = (tuple(int(t) for t in ids), str(messages[-1]["content"]))
        return self.seen[key]


def load_prompts(path: str | Path, tokenizer, prompt_key: str = "prompt",
                 answer_key: str = "reward_model.ground_truth", apply_chat_template: bool = True,
                 max_prompt_tokens: int | None = None) -> list[Prompt]:
    """Tokenized prompts of a data file, in file order, repeats kept."""
    columns = list(dict.fromkeys(k.split(".")[0] for k in (prompt_key, answer_key)))
    tokenize = _Tokenize(tokenizer, apply_chat_template)
    prompts, too_long, rows, sources = [], 0, 0, Counter()
    for i, row in enumerate(iter_rows(path, columns, optional=("data_source",))):
        rows += 1
        where = f"{path} row {i}"
        ids, text = tokenize(_messages(_dig(row, prompt_key, where), where))
        source = str(row.get("data_source") or "default")
        sources[source] += 1
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(i, ids, str(_dig(row, answer_key, where)), text, source))
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    log.info("%s: %d rows, %d distinct prompts, data_source %s", path, rows, len(tokenize.seen), dict(sources))
    if too_long:
        log.warning("%s: dropped %d of %d prompts longer than %s tokens", path, too_long, rows, max_prompt_tokens)
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
        import torch  # here, not at the top: the manager starts its engines before it pays for torch

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
