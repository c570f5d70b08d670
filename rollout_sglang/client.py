"""HTTP client of SGLang's server API (the endpoints RL training uses).

What it does: token-in / token-out generation with per-token log-probs, the weight-update
group and distributed / tensor weight updates, pause / continue, memory release / resume,
cache flush, health and weight version, with SGLang 0.5's request and response schemas.
The same client talks to `sglang.launch_server` on GPU and to our CPU server. What it does
not: start servers (engine.py) or retry on another engine (the rollout manager does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests


class EngineError(RuntimeError):
    """An engine request failed: names the URL, the endpoint, the status and the message."""


@dataclass(frozen=True)
class GenerateOutput:
    """One generated response."""

    output_ids: list[int]
    """Generated token ids (stop token included when generated)."""
    output_logprobs: list[float]
    """Log-prob of each generated token under the engine's weights (nats)."""
    finish_reason: str
    """'stop', 'length' or 'abort'."""
    weight_version: str | None = None
    """Weight version the engine reported for this response, when it does."""


class SGLangClient:
    """Client of one SGLang-compatible server at `base_url`."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, retries: int = 0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._session = requests.Session()

    def _request(self, method: str, endpoint: str, payload: dict | None = None,
                 timeout_s: float | None = None) -> Any:
        url = f"{self.base_url}{endpoint}"
        last: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                resp = self._session.request(method, url, json=payload, timeout=timeout_s or self.timeout_s)
            except requests.RequestException as exc:
                last = exc
                continue
            if resp.status_code != 200:
                raise EngineError(f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:500]}")
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                return resp.text
        raise EngineError(f"{method} {url} failed: {last}") from last

    def _checked(self, endpoint: str, payload: dict) -> dict:
        out = self._request("POST", endpoint, payload)
        if isinstance(out, dict) and out.get("success") is False:
            raise EngineError(f"POST {self.base_url}{endpoint} refused: {out.get('message')}")
        return out

    def health(self, timeout_s: float = 5.0) -> bool:
        """True when the server answers /health with 200."""
        try:
            self._request("GET", "/health", timeout_s=timeout_s)
        except EngineError:
            return False
        return True

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any],
                 return_logprob: bool = True) -> list[GenerateOutput]:
        """One response per row of `input_ids`, or `sampling_params["n"]` per row, row-major."""
        payload = {"input_ids": input_ids, "sampling_params": sampling_params,
                   "return_logprob": return_logprob, "logprob_start_len": -1}
        out = self._request("POST", "/generate", payload)
        items = out if isinstance(out, list) else [out]
        expected = len(input_ids) * int(sampling_params.get("n", 1))
        if len(items) != expected:
            raise EngineError(f"{self.base_url}/generate returned {len(items)} outputs, expected {expected}")
        return [_parse_output(item) for item in items]

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str = "nccl") -> dict:
        """Ask the engine to join the weight-update group (blocks until the trainer joins)."""
        return self._checked("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size,
            "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], group_name: str,
                                        flush_cache: bool = True,
                                        weight_version: str | None = None) -> dict:
        """Receive `names` by broadcast from rank 0 of the weight group and load them."""
        return self._checked("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "flush_cache": flush_cache, "weight_version": weight_version})

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                   flush_cache: bool = True, weight_version: str | None = None) -> dict:
        """Colocated update: tensors serialized by the caller (per engine TP rank)."""
        return self._checked("/update_weights_from_tensor", {
            "serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
            "flush_cache": flush_cache, "weight_version": weight_version})

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """The first `truncate_size` values of parameter `name` (HF name), flattened."""
        return self._checked("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    def get_server_info(self) -> dict:
        return self._request("GET", "/get_server_info")

    def get_weight_version(self) -> str:
        out = self._request("GET", "/get_weight_version")
        return str(out["weight_version"] if isinstance(out, dict) else out)

    def pause_generation(self, mode: str = "abort") -> None:
        self._request("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._request("POST", "/continue_generation", {})

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._request("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._request("POST", "/resume_memory_occupation", {"tags": tags})

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache")


def _parse_output(item: dict) -> GenerateOutput:
    meta = item.get("meta_info", {})
    triples = meta.get("output_token_logprobs") or []
    ids = item.get("output_ids")
    if ids is None:
        ids = [t[1] for t in triples]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type", "abort") if isinstance(reason, dict) else str(reason)
    version = meta.get("weight_version")
    return GenerateOutput(list(ids), [float(t[0]) for t in triples], kind,
                          None if version is None else str(version))
