"""HTTP client of SGLang's server API (the endpoints RL training uses), SGLang 0.5.21 - 0.5.x.

What it does: token-in / token-out generation with per-token log-probs (one sampling-params
dict for all rows, or one per row), the weight-update group, weight-update sessions
(`/begin_weight_update` ... `/end_weight_update`, which SGLang >= 0.5.21 requires around every
distributed or tensor update), pause / continue, memory release / resume, cache flush,
health and readiness, aborting requests by id, the weight version (`/model_info`; "default" before the first
update) and the server version (`/server_info`, checked once against the supported range). Every request carries
the engine's API key when one is set. The same client talks to `sglang.launch_server` and to
our CPU server, which implements the same contract. What it does not: start servers
(engine.py), retry on another engine (the rollout manager does), or remember which memory
tags an engine released (the rollout manager does: SGLang's scheduler dies on a resume of a
tag it did not release).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

SUPPORTED_SGLANG = ((0, 5, 21), (0, 6, 0))
"""[lowest, highest) SGLang server version this client speaks: weight-update sessions arrived
in 0.5.21, and /model_info reports the weight version since /get_weight_version was removed."""


class EngineError(RuntimeError):
    """An engine request failed: names the URL, the endpoint, the status and the message."""

    def __init__(self, message: str, status: int | None = None, body: Any = None,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        """HTTP status of the reply, None when no reply came (connection refused, timeout)."""
        self.body = body
        """The reply's JSON body (or text), None when no reply came."""
        self.timed_out = timed_out
        """No reply came within the request's timeout: the engine neither answered nor refused."""


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


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as '0.5.23' or '0.5.23.post1'."""
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def check_supported_version(version: str, url: str) -> None:
    """Raise EngineError when the server's SGLang version is outside SUPPORTED_SGLANG."""
    low, high = SUPPORTED_SGLANG
    if not low <= parse_version(version) < high:
        raise EngineError(
            f"engine {url} runs SGLang {version}; this trainer speaks SGLang "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))} (weight-update sessions, "
            "weight version in /model_info); install sglang==0.5.23 (the version tested)")


class SGLangClient:
    """Client of one SGLang-compatible server at `base_url`."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, retries: int = 0,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

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
            body = _body(resp)
            if resp.status_code != 200:
                raise EngineError(f"{method} {url} -> HTTP {resp.status_code}: {_message(body)}",
                                  resp.status_code, body)
            return body
        if isinstance(last, requests.Timeout):
            raise EngineError(f"{method} {url} timed out: no reply within {timeout_s or self.timeout_s:g} s "
                              f"({last})", timed_out=True) from last
        raise EngineError(f"{method} {url} failed: {last}") from last

    def _checked(self, endpoint: str, payload: dict, timeout_s: float | None = None) -> dict:
        """POST to a control endpoint that answers {"success", "message"}; a refusal raises
        with SGLang's message (SGLang answers 400 with the same body)."""
        out = self._request("POST", endpoint, payload, timeout_s)
        if isinstance(out, dict) and out.get("success") is False:
            raise EngineError(f"POST {self.base_url}{endpoint} refused: {out.get('message')}", 200, out)
        return out

    def health(self, timeout_s: float = 5.0) -> bool:
        """True when the server answers /health with 200 (SGLang: 503 until its own warmup
        request has finished, `http_server.py:735-736`)."""
        try:
            self._request("GET", "/health", timeout_s=timeout_s)
        except EngineError:
            return False
        return True

    def answers(self, timeout_s: float = 5.0) -> bool:
        """True when the server's HTTP process answers /health at all, whatever the status: a
        503 from a server still warming up (or shutting down) is an answer, only silence (no
        connection, no reply within `timeout_s`) is not. What a hang probe asks."""
        try:
            self._request("GET", "/health", timeout_s=timeout_s)
        except EngineError as exc:
            return exc.status is not None
        return True

    def ready(self, timeout_s: float = 5.0) -> bool:
        """True when /ready answers 200: SGLang's readiness (started, warmup done, not paused:
        `http_server.py:714-718`, `tokenizer_manager.py:728-734`); needs no API key."""
        try:
            self._request("GET", "/ready", timeout_s=timeout_s)
        except EngineError:
            return False
        return True

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any] | list[dict[str, Any]],
                 return_logprob: bool = True, rids: list[str] | None = None) -> list[GenerateOutput]:
        """One response per row of `input_ids` (`n` per row when the params say so), row-major.

        `sampling_params` is one dict for every row or a list with one dict per row (how each
        sample gets its own `sampling_seed`); `rids`, one distinct request id per row, lets
        `abort_request` stop a row while it runs (an aborted row comes back with what it
        generated so far and finish_reason 'abort')."""
        per_row = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        if len(per_row) != len(input_ids):
            raise ValueError(f"{len(per_row)} sampling-params dicts for {len(input_ids)} rows; "
                             "send one dict, or one per row")
        payload = {"input_ids": input_ids, "sampling_params": sampling_params,
                   "return_logprob": return_logprob, "logprob_start_len": -1}
        if rids is not None:
            payload["rid"] = rids
        out = self._request("POST", "/generate", payload)
        items = out if isinstance(out, list) else [out]
        expected = sum(int(p.get("n", 1)) for p in per_row)
        if len(items) != expected:
            raise EngineError(f"{self.base_url}/generate returned {len(items)} outputs, expected {expected}")
        return [_parse_output(item) for item in items]

    # ---- weight updates ------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str = "nccl") -> dict:
        """Ask the engine to join the weight-update group (blocks until the trainer joins)."""
        return self._checked("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size,
            "group_name": group_name, "backend": backend})

    def destroy_weights_update_group(self, group_name: str, timeout_s: float | None = None) -> dict:
        """Ask the engine to leave and destroy the weight-update group `group_name` (before a
        new one is formed: each group holds a communicator and its buffers on the engine);
        SGLang refuses a name it does not hold (400)."""
        return self._checked("/destroy_weights_update_group", {"group_name": group_name}, timeout_s)

    def begin_weight_update(self) -> dict:
        """Open a weight-update session; SGLang refuses updates outside one (and a second
        session while one is open)."""
        return self._checked("/begin_weight_update", {})

    def end_weight_update(self, timeout_s: float | None = None) -> dict:
        """Close the session opened by `begin_weight_update` (finalizes the loaded weights)."""
        return self._checked("/end_weight_update", {}, timeout_s)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], group_name: str,
                                        flush_cache: bool = True,
                                        weight_version: str | None = None) -> dict:
        """Receive `names` by broadcast from rank 0 of the weight group and load them (inside
        a session; SGLang answers a refusal before it joins the broadcast)."""
        return self._checked("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "flush_cache": flush_cache, "weight_version": weight_version})

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                   flush_cache: bool = True, weight_version: str | None = None) -> dict:
        """Colocated update (inside a session): tensors serialized by the caller, one entry
        per engine TP rank."""
        return self._checked("/update_weights_from_tensor", {
            "serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
            "flush_cache": flush_cache, "weight_version": weight_version})

    # ---- state ---------------------------------------------------------------------------
    def model_info(self) -> dict:
        return self._request("GET", "/model_info")

    def server_info(self) -> dict:
        return self._request("GET", "/server_info")

    def weight_version(self) -> str:
        """The version of the last update ('default' before the first), from /model_info."""
        return str(self.model_info()["weight_version"])

    def check_version(self) -> str:
        """The server's SGLang version, after checking it is in SUPPORTED_SGLANG."""
        version = str(self.server_info().get("version"))
        check_supported_version(version, self.base_url)
        return version

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort the live request `rid` (SGLang's scheduler then also aborts requests whose id
        starts with it), or all of them; an id that is not live, a prefix included, is ignored.
        An aborted /generate answers with its partial output."""
        self._request("POST", "/abort_request", {"rid": rid, "abort_all": abort_all})

    def pause_generation(self, mode: str = "abort") -> None:
        self._request("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._request("POST", "/continue_generation", {})

    def release_memory_occupation(self, tags: list[str]) -> None:
        """Free `tags` ('weights', 'kv_cache'); the caller remembers what it released."""
        self._request("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str]) -> None:
        """Bring `tags` back; only tags released before (SGLang's scheduler dies otherwise)."""
        self._request("POST", "/resume_memory_occupation", {"tags": tags})

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache")


def _body(resp: requests.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        return resp.text


def _message(body: Any) -> str:
    """SGLang's error text from any of its error bodies ({"message"}, {"error": {"message"}},
    {"error": "Unauthorized"}, {"detail"})."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        for key in ("message", "error", "detail"):
            if key in body:
                return str(body[key])[:500]
    return str(body)[:500]


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
