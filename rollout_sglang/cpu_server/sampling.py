"""Batched autoregressive sampling with a KV cache for the CPU rollout server.

What it does: left-pads a batch of token-id prompts, decodes with transformers' KV cache,
samples with temperature / top-k / top-p (greedy at temperature 0; each row seeded by its own
`sampling_seed` when given), honours max_new_tokens, min_new_tokens and stop tokens, and returns
SGLang-shaped outputs with the log-prob of each sampled token under the temperature-scaled
distribution it was sampled from (the trainer takes its log-probs at the same temperature); reads a model's end-of-sequence
tokens. What it does not: serve HTTP (cpu_server.py).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

import torch


def eos_token_ids(config: Any, model_path: str) -> list[int]:
    """The tokens that end a sample: generation_config.json's eos_token_id (as transformers
    and SGLang read it), else the model config's."""
    ids = config.eos_token_id
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id", ids)
    if ids is None:
        return []
    return list(ids) if isinstance(ids, list) else [int(ids)]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _sample(probs: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, each row from its own generator (the global one when None)."""
    return torch.cat([torch.multinomial(probs[i: i + 1], 1, generator=g) for i, g in enumerate(gens)]).squeeze(-1)


def _finish_reason(kind: str, tokens: list[int], max_new: int) -> dict[str, Any]:
    """SGLang's finish_reason object: the matched stop token, the length limit, or why it
    was aborted: SGLang's FINISH_ABORT for a running request ("Aborted", status_code None, so
    the reply is a 200), its tokenizer manager's {"type", "message"} for one aborted before
    it ran ("Abort in waiting queue")."""
    if kind == "stop":
        return {"type": "stop", "matched": tokens[-1]}
    if kind == "length":
        return {"type": "length", "length": max_new}
    if kind == "abort_waiting":
        return {"type": "abort", "message": "Abort in waiting queue"}
    return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


def _prefill(model: torch.nn.Module, rows: list[list[int]]):
    """The KV cache, last logits, attention mask and next positions of the left-padded rows."""
    b, longest = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(b, longest, dtype=torch.long)
    mask = torch.zeros(b, longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r)
        mask[i, longest - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.past_key_values, out.logits[:, -1].float(), mask, positions[:, -1] + 1


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          gens: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row (greedy at temperature 0) and its log-prob under the
    temperature-scaled distribution."""
    if temperature <= 0:
        logp = torch.log_softmax(logits, -1)
        nxt = logits.argmax(-1)
    else:
        logp = torch.log_softmax(logits / temperature, -1)
        probs = torch.softmax(_filter_logits(logits / temperature, top_k, top_p), -1)
        nxt = _sample(probs, gens)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)


def _output(row: list[int], tokens: list[int], logps: list[float], reason: str, max_new: int) -> dict[str, Any]:
    """SGLang's /generate reply for one row."""
    return {
        "output_ids": list(tokens),
        "meta_info": {
            "finish_reason": _finish_reason(reason, tokens, max_new),
            "prompt_tokens": len(row),
            "completion_tokens": len(tokens),
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logps, tokens)],
        },
    }


class _Rows:
    """What each row of a batch has generated, and whether (and why) it has finished."""

    def __init__(self, rows: list[list[int]], max_new: int,
                 row_done: Callable[[int, dict[str, Any]], None] | None) -> None:
        self.rows, self.max_new, self.row_done = rows, max_new, row_done
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.logps: list[list[float]] = [[] for _ in rows]
        self.reasons = ["length"] * len(rows)
        self.done = [False] * len(rows)
        self.outputs: dict[int, dict[str, Any]] = {}

    def finish(self, i: int, reason: str) -> None:
        """Row i ends now; its reply goes out at once."""
        self.done[i], self.reasons[i] = True, reason
        self.outputs[i] = _output(self.rows[i], self.tokens[i], self.logps[i], reason, self.max_new)
        if self.row_done is not None:
            self.row_done(i, self.outputs[i])

    def finish_all(self, reason: str) -> list[dict[str, Any]]:
        for i in range(len(self.rows)):
            if i not in self.outputs:
                self.finish(i, reason)
        return [self.outputs[i] for i in range(len(self.rows))]


def _stop_ids(params: dict[str, Any], eos_ids: list[int]) -> set[int]:
    stop = set(int(t) for t in (params.get("stop_token_ids") or []))
    return stop if params.get("ignore_eos") else stop | set(eos_ids)


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    rows: list[list[int]],
    params: dict[str, Any],
    eos_ids: list[int],
    abort: threading.Event | None = None,
    seeds: list[int | None] | None = None,
    row_abort: list[threading.Event] | None = None,
    row_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One SGLang-style output dict per prompt row; `seeds` (one per row) overrides the
    params' single `sampling_seed`, so the rows of one group sample independently. `abort`
    stops every row, `row_abort[i]` (set by /abort_request) stops row i alone: an aborted row
    returns what it generated so far. `row_done(i, output)` is called as soon as row i has
    finished (stop token, abort, or the end), so a caller can answer it before the batch ends."""
    temperature, top_p = float(params.get("temperature", 1.0)), float(params.get("top_p", 1.0))
    top_k, max_new = int(params.get("top_k", -1)), int(params.get("max_new_tokens", 128))
    min_new = int(params.get("min_new_tokens", 0))
    seeds = seeds if seeds is not None else [params.get("sampling_seed")] * len(rows)
    gens = [torch.Generator().manual_seed(int(s)) if s is not None else None for s in seeds]
    stop_ids, b = _stop_ids(params, eos_ids), len(rows)
    row_abort = row_abort or [threading.Event() for _ in range(b)]
    state = _Rows(rows, max_new, row_done)
    cache, logits, mask, next_pos = _prefill(model, rows)
    for step in range(max_new):
        if abort is not None and abort.is_set():
            return state.finish_all("abort")
        for i in range(b):
            if not state.done[i] and row_abort[i].is_set():
                state.finish(i, "abort" if state.tokens[i] else "abort_waiting")
        if all(state.done):
            break
        if step < min_new and stop_ids:
            logits[:, sorted(stop_ids)] = float("-inf")
        nxt, chosen = _pick(logits, temperature, top_k, top_p, gens)
        for i in range(b):
            if not state.done[i]:
                state.tokens[i].append(int(nxt[i]))
                state.logps[i].append(float(chosen[i]))
                if int(nxt[i]) in stop_ids:
                    state.finish(i, "stop")
        if all(state.done) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        next_pos = next_pos + 1
    return state.finish_all("length")
