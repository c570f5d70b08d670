"""The bounds the CPU rollout server holds a /generate request to, before it generates anything.

What it does: checks a /generate body as a production server must -- token ids (ints in the
vocabulary), prompt length (< the context length), sampling parameters' types and ranges
(SGLang 0.5.23's `SamplingParams.verify`: temperature finite and >= 0, top_p in (0, 1], top_k
-1 or >= 1, min_p in [0, 1], max_new_tokens >= 0, min_new_tokens in [0, max_new_tokens],
sampling_seed an int64), prompt + max_new_tokens <= the context length (SGLang's
tokenizer-manager check), n and the number of sequences of one request -- and returns the
first violation as a message naming the field, the value and the bound (the server answers it
with HTTP 400, as SGLang does). A missing max_new_tokens becomes SGLang's default (128),
capped at what the context leaves; request ids (`rid`) are normalised as SGLang does. What it
does not: check the body size (the server's middleware does, from Content-Length) or generate.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128


class BadRequest(ValueError):
    """A /generate body outside the server's bounds; the message names field and bound."""


@dataclass(frozen=True)
class Bounds:
    """The limits of one server."""

    vocab_size: int
    context_len: int
    """Prompt + generated tokens of one sequence (the model's max_position_embeddings)."""
    max_sequences: int
    """Sequences one request may ask for (rows x n)."""


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"sampling_params.{field}={value!r}: must be a number")
    return float(value)


def _integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"sampling_params.{field}={value!r}: must be an integer")
    return value


def _token_ids(field: str, ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise BadRequest(f"{field}: must be a non-empty list of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise BadRequest(f"{field}: token id {t!r} is not an integer")
        if not 0 <= t < vocab_size:
            raise BadRequest(f"{field}: token id {t} is out of the vocabulary [0, {vocab_size})")
    return ids


def check_rows(input_ids: Any, bounds: Bounds) -> list[list[int]]:
    """The prompt rows of `input_ids` (one list of ids, or a list of them)."""
    if not isinstance(input_ids, list) or not input_ids:
        raise BadRequest("input_ids: required, a list of token ids or a list of such lists "
                         "(token-in/token-out API; text input is not supported)")
    rows = [input_ids] if not isinstance(input_ids[0], list) else input_ids
    for i, row in enumerate(rows):
        _token_ids(f"input_ids[{i}]", row, bounds.vocab_size)
        if len(row) >= bounds.context_len:
            raise BadRequest(f"input_ids[{i}]: the input ({len(row)} tokens) is longer than the "
                             f"model's context length ({bounds.context_len} tokens)")
    return rows


def check_sampling(params: Any, longest_prompt: int, bounds: Bounds) -> dict[str, Any]:
    """`params` checked, with max_new_tokens filled in when absent."""
    if not isinstance(params, dict):
        raise BadRequest(f"sampling_params={params!r}: must be an object")
    p = dict(params)
    temperature = _number("temperature", p.get("temperature", 1.0))
    if not math.isfinite(temperature) or temperature < 0:
        raise BadRequest(f"sampling_params.temperature={temperature}: must be a non-negative finite number")
    top_p = _number("top_p", p.get("top_p", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"sampling_params.top_p={top_p}: must be in (0, 1]")
    min_p = _number("min_p", p.get("min_p", 0.0))
    if not 0.0 <= min_p <= 1.0:
        raise BadRequest(f"sampling_params.min_p={min_p}: must be in [0, 1]")
    top_k = _integer("top_k", p.get("top_k", -1))
    if top_k < 1 and top_k != -1:
        raise BadRequest(f"sampling_params.top_k={top_k}: must be -1 (disabled) or at least 1")
    room = bounds.context_len - longest_prompt
    max_new = _integer("max_new_tokens", p.get("max_new_tokens", min(SGLANG_DEFAULT_MAX_NEW_TOKENS, room)))
    if max_new < 0:
        raise BadRequest(f"sampling_params.max_new_tokens={max_new}: must be at least 0")
    if max_new > room:
        raise BadRequest(f"sampling_params.max_new_tokens={max_new}: the prompt ({longest_prompt} tokens) "
                         f"+ max_new_tokens must be <= the model's context length ({bounds.context_len} "
                         f"tokens), so at most {room}")
    min_new = _integer("min_new_tokens", p.get("min_new_tokens", 0))
    if not 0 <= min_new <= max_new:
        raise BadRequest(f"sampling_params.min_new_tokens={min_new}: must be in [0, max_new_tokens={max_new}]")
    n = _integer("n", p.get("n", 1))
    if not 1 <= n <= bounds.max_sequences:
        raise BadRequest(f"sampling_params.n={n}: must be in [1, {bounds.max_sequences}] (--max-sequences)")
    seed = p.get("sampling_seed")
    if seed is not None and not -(2**63) <= _integer("sampling_seed", seed) <= 2**63 - 1:
        raise BadRequest(f"sampling_params.sampling_seed={seed}: must be in [-2**63, 2**63 - 1]")
    stop = p.get("stop_token_ids")
    if stop is not None:
        _token_ids("sampling_params.stop_token_ids", stop, bounds.vocab_size)
    if not isinstance(p.get("ignore_eos", False), bool):
        raise BadRequest(f"sampling_params.ignore_eos={p['ignore_eos']!r}: must be true or false")
    p["max_new_tokens"], p["n"] = max_new, n
    return p


def check_generate(req: Any, bounds: Bounds) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """The rows and one checked sampling-params dict per row of a /generate body."""
    if not isinstance(req, dict):
        raise BadRequest("the /generate body must be a JSON object")
    rows = check_rows(req.get("input_ids"), bounds)
    params = req.get("sampling_params") or {}
    per_row = params if isinstance(params, list) else [params] * len(rows)
    if len(per_row) != len(rows):
        raise BadRequest(f"sampling_params: {len(per_row)} dicts for {len(rows)} input_ids rows; "
                         "send one dict, or one per row")
    longest = max(len(r) for r in rows)
    checked = [check_sampling(p, longest, bounds) for p in per_row]
    total = sum(p["n"] for p in checked)
    if total > bounds.max_sequences:
        raise BadRequest(f"input_ids x sampling_params.n = {total} sequences: at most "
                         f"{bounds.max_sequences} per request (--max-sequences)")
    return rows, checked


def check_rids(rid: Any, rows: int) -> list[str]:
    """One request id per row, as SGLang's GenerateReqInput normalises `rid`: none given, a
    fresh id each; one string, `{rid}_{i}` for a batch (the string itself for one row); a list,
    one distinct string per row."""
    if rid is None:
        return [uuid.uuid4().hex for _ in range(rows)]
    if isinstance(rid, str):
        return [rid] if rows == 1 else [f"{rid}_{i}" for i in range(rows)]
    if not isinstance(rid, list) or not all(isinstance(r, str) for r in rid):
        raise BadRequest(f"rid={rid!r}: must be a string or a list of strings")
    if len(rid) != rows:
        raise BadRequest(f"rid: {len(rid)} ids for {rows} input_ids rows; the rids length must match "
                         "the batch size")
    if len(set(rid)) != len(rid):
        raise BadRequest(f"rid: duplicate request ids {sorted({r for r in rid if rid.count(r) > 1})}; "
                         "every row needs its own id")
    return list(rid)
