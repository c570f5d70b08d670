"""A CPU rollout server that speaks SGLang 0.5.23's HTTP API, generating with transformers.

What it does: serves /generate (token ids in, token ids and per-token log-probs out; one
sampling-params dict or one per row; batched sampling with temperature / top-p / top-k / stop
tokens and a KV cache), receives weights from the trainer exactly as SGLang does
(/init_weights_update_group joins a standalone torch.distributed group, gloo here instead of
NCCL, and /destroy_weights_update_group leaves it; /server_info lists the groups held as
"weight_update_groups", a field SGLang does not have; /update_weights_from_distributed receives tensors by broadcast from rank 0 and loads them
by HF name; /update_weights_from_tensor takes SGLang's payload, tensors by shared-memory
handle), and implements pause / continue, memory release / resume per tag, flush_cache,
health and readiness, /model_info (weight version, "default" before the first update) and
/server_info. Start-up as SGLang's: the routes serve at once, but the server counts as started
only after its warmup request (one short /generate through its own HTTP API, sent once
/model_info answers); until then /health and /ready answer 503 (SGLang's ServerStatus.Starting,
sglang/srt/entrypoints/http_server.py:735-736, 2360-2440). /health never generates (SGLang with
SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, which our launcher sets); /ready is 200 only once
started and while generation is not paused (tokenizer_manager.py:728-734).
It enforces SGLang 0.5.23's contract, refusals included, with SGLang's status codes and
bodies (tests/rollout/sglang/test_conformance.py holds it to the real server): updates only inside a
`/begin_weight_update` ... `/end_weight_update` session (400 outside; a second begin 400),
`--api-key` required on every route but /health and /ready (401), /get_weight_version and
/get_weights_by_name absent (404). Two deliberate differences: resuming a tag that was not
released is a 400 here, where SGLang's scheduler dies (KeyError); callers must never send it;
and a distributed update whose receive fails (the trainer aborted its side of the group) is a
400 here, where SGLang's scheduler does not catch it.
Sampling honours `sampling_seed` always (SGLang only with --enable-deterministic-inference).
Bounded like a production server: every /generate is checked before it runs
(request_bounds.py: ids in the vocabulary, prompt + max_new_tokens within the context, n and
sequences per request, sampling-parameter types and ranges; 400 naming the field and bound) and
bodies over --max-body-bytes are refused (400); nothing waits on the model lock, or while
paused, longer than --lock-timeout-s (then 503); SIGTERM aborts in-flight generation and the
server exits within seconds; /init_weights_update_group dials only the trainer addresses of
--weight-sync-hosts (default loopback) and gives up after --weight-sync-timeout-s. With --fd
it serves on a listening socket its launcher bound (the port is then never free in between).
Concurrent /generate requests are decoded together, and /abort_request aborts them by request
id as SGLang does (cpu_generation.py). What it does not: paged attention, continuous batching
(a request waits for the running batch to end) or any GPU feature: it exists so the trainer's
client and weight-sync path run for real on a CPU-only machine.

    python -m rollout_sglang.cpu_server.server --model-path DIR --host 127.0.0.1 --port 30000
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import uvicorn
from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rollout_sglang.cpu_server.generation import Batcher, generation_routes
from rollout_sglang.cpu_server.request_bounds import Bounds
from rollout_sglang.cpu_server.limits import Busy, Limits, StoppableServer, refused_peer
from rollout_sglang.cpu_server.sampling import eos_token_ids
from rollout_sglang.cpu_server.startup import warm_up
from rollout_sglang.sglang.tensor_payload import deserialize_named_tensors
from rollout_sglang.sglang.weight_group import init_weight_group

log = logging.getLogger("cpu_server")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTRACT_VERSION = "0.5.23"
"""The SGLang release whose HTTP contract this server implements (reported by /server_info)."""
_TAGS = ("weights", "kv_cache", "cuda_graph")
WORKER_THREADS = 1024
"""Requests served at once (each /generate holds a thread while it waits for its batch)."""


class ServerState:
    """The model and everything the endpoints share, guarded by one lock."""

    def __init__(self, model_path: str, seed: int, api_key: str | None = None,
                 limits: Limits = Limits()) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_path = model_path
        self.limits = limits
        self.lock = threading.Lock()
        self.update_lock = threading.Lock()
        """Held for a whole weight update, receive included: SGLang's tokenizer manager runs
        one update at a time under its model-update writer lock, so updates from several
        senders (one weight group per pipeline stage) are loaded one after another."""
        self.running = threading.Event()
        self.running.set()
        self.started = threading.Event()
        """Set when the warmup request has finished (SGLang's ServerStatus.Up)."""
        self.abort = threading.Event()
        torch.manual_seed(seed)
        if any(Path(model_path).glob("*.safetensors")):
            self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
        else:  # the trainer pushes weights before the first rollout
            self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        self.model.eval()
        self.eos_ids = eos_token_ids(self.model.config, model_path)
        cfg = self.model.config
        self.bounds = Bounds(cfg.vocab_size, cfg.max_position_embeddings, limits.max_sequences)
        self.api_key = api_key
        self.weight_version = "default"
        self.session_open = False
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.released_tags: set[str] = set()
        self.released_shapes: dict[str, torch.Size] = {}
        self.release_count = 0
        self.batcher = Batcher(self)

    def params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    @contextlib.contextmanager
    def locked(self):
        """Hold the model lock, waiting at most --lock-timeout-s for it."""
        if not self.lock.acquire(timeout=self.limits.lock_timeout_s):
            raise Busy(f"the model lock was not free within {self.limits.lock_timeout_s} s "
                       "(--lock-timeout-s); a long request holds it")
        try:
            yield
        finally:
            self.lock.release()


def _fail(message: str, status: int = 400) -> JSONResponse:
    """SGLang's refusal of a control request: {"success": false, "message"}."""
    return JSONResponse({"success": False, "message": message}, status_code=status)


def _error(message: str, status: int = 400) -> JSONResponse:
    """SGLang's error body for a request that raised: {"error": {"message"}}."""
    return JSONResponse({"error": {"message": message}}, status_code=status)


@contextlib.asynccontextmanager
async def _many_threads(app: FastAPI):
    """Room for many requests at once: sync routes run on anyio's worker threads (40 by
    default), and a rollout manager has one /generate per group in flight, each waiting in
    the batcher for its batch."""
    import anyio.to_thread

    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    yield


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(lifespan=_many_threads)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(str(exc), 503)

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > state.limits.max_body_bytes:
            return _error(f"request body: {size} bytes, at most {state.limits.max_body_bytes} "
                          "(--max-body-bytes)")
        return await call_next(request)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        # As SGLang's --api-key (utils/auth.py:101-105): every route but /health* and /ready*
        # needs "Authorization: Bearer KEY".
        if state.api_key and not request.url.path.startswith(("/health", "/ready")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given, f"Bearer {state.api_key}"):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        # async: answered on the event loop even while every worker thread waits in /generate.
        # As SGLang: an empty body, 503 while still warming up.
        return Response(status_code=200 if state.started.is_set() else 503)

    @app.get("/ready")
    async def ready() -> Response:
        return Response(status_code=200 if state.started.is_set() and state.running.is_set() else 503)

    @app.get("/model_info")
    @app.get("/get_model_info")
    def model_info() -> dict:
        return {"model_path": state.model_path, "is_generation": True,
                "weight_version": state.weight_version, "model_type": state.model.config.model_type,
                "architectures": list(state.model.config.architectures or [type(state.model).__name__])}

    @app.get("/server_info")
    @app.get("/get_server_info")
    def server_info() -> dict:
        return {"model_path": state.model_path, "tp_size": 1, "version": CONTRACT_VERSION,
                "frontend": "rollout_sglang.cpu_server.server", "memory_release_count": state.release_count,
                "released_tags": sorted(state.released_tags), "aborted_requests": state.batcher.aborted_rows,
                "weight_update_groups": sorted(state.groups)}

    generation_routes(app, state)
    _weight_routes(app, state)
    _memory_routes(app, state)
    return app


def _weight_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/begin_weight_update")
    def begin(req: dict[str, Any] = Body(default={})) -> Any:
        with state.locked():
            if state.session_open:
                return _fail("a weight-update session is already open; call end_weight_update() first")
            state.session_open = True
        return {"success": True, "message": "Success"}

    @app.post("/end_weight_update")
    def end(req: dict[str, Any] = Body(default={})) -> Any:
        with state.locked():
            if not state.session_open:
                return _fail("no weight-update session is open; call begin_weight_update() first")
            state.session_open = False
        return {"success": True, "message": "Success"}

    @app.post("/init_weights_update_group")
    def init_group(req: dict[str, Any] = Body(...)) -> Any:
        refused = refused_peer(str(req.get("master_address")), state.limits.weight_sync_hosts)
        if refused:
            return _fail(refused)
        try:
            group = init_weight_group(req["master_address"], int(req["master_port"]),
                                      int(req["rank_offset"]), int(req["world_size"]),
                                      req.get("group_name", "weight_update_group"), "gloo",
                                      rendezvous_timeout_s=state.limits.weight_sync_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the trainer
            return _fail(f"init_weights_update_group failed: {exc}")
        state.groups[req.get("group_name", "weight_update_group")] = group
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @app.post("/destroy_weights_update_group")
    def destroy_group(req: dict[str, Any] = Body(default={})) -> Any:
        # As SGLang 0.5.23 (weight_updater.destroy_weights_update_group): pop, destroy, 400 for
        # a name not held. A receive still waiting in the group ends when the trainer's side
        # closes (or with the group's timeout); its handler then returns the error.
        group = state.groups.pop((req or {}).get("group_name", "weight_update_group"), None)
        if group is None:
            return _fail("The group to be destroyed does not exist.")
        try:
            dist.destroy_process_group(group)
        except Exception as exc:  # noqa: BLE001 - reported to the trainer, as SGLang does
            return _fail(f"Failed to destroy custom process group: {exc}.")
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    @app.post("/update_weights_from_distributed")
    def update_distributed(req: dict[str, Any] = Body(...)) -> Any:
        # Every refusal comes before the broadcast is joined, as in SGLang: the trainer sees
        # the 400 while it waits in the broadcast, and stops.
        with state.update_lock:
            return _receive_and_apply(state, req)

    @app.post("/update_weights_from_tensor")
    def update_tensor(req: dict[str, Any] = Body(...)) -> Any:
        with state.update_lock:
            return _apply_tensor_update(state, req)


def _receive_and_apply(state: ServerState, req: dict[str, Any]) -> Any:
    """/update_weights_from_distributed: receive by broadcast from rank 0 of the named group."""
    if not state.session_open:
        return _fail("update_weights_from_distributed must run between begin_weight_update() "
                     "and end_weight_update()")
    name = req.get("group_name", "weight_update_group")
    group = state.groups.get(name)
    if group is None:
        return _fail(f"Failed to receive weights: Group {name} not in {sorted(state.groups)}. "
                     "Please call `init_weights_update_group` first.")
    received = []
    # Receive everything before validating: the trainer is broadcasting all of it.
    try:
        for tensor_name, dtype, shape in zip(req["names"], req["dtypes"], req["shapes"]):
            buf = torch.empty(shape, dtype=_DTYPES[dtype])
            dist.broadcast(buf, src=0, group=group)
            received.append((tensor_name, buf))
    except Exception as exc:  # noqa: BLE001 - the trainer aborted its side, or the group was destroyed
        # A reply, not a raise: uvicorn closes the connection of a route that raised after
        # its 500, and the trainer's next request on it (/end_weight_update) would be reset.
        return _fail(f"Failed to receive weights from group {name}: {exc}. The weights are "
                     "partially updated; the whole update must be sent again.")
    return _apply_update(state, received, req.get("weight_version"))


def _apply_tensor_update(state: ServerState, req: dict[str, Any]) -> Any:
    """/update_weights_from_tensor: SGLang's payload, tensors by shared-memory handle."""
    if not state.session_open:
        return _fail("update_weights_from_tensor must run between begin_weight_update() "
                     "and end_weight_update()")
    # One entry per engine TP rank, as in SGLang; this server is TP rank 0 of 1.
    entries = req.get("serialized_named_tensors") or []
    if req.get("load_format") not in (None, "direct"):
        return _fail(f"load_format={req.get('load_format')!r} is not supported by the CPU server; "
                     "send a list of (name, tensor) pairs with load_format=None")
    if not entries:
        return _fail("serialized_named_tensors is empty; send one entry per engine TP rank")
    try:
        named = deserialize_named_tensors(entries[0])
    except ValueError as exc:
        return _fail(str(exc))
    return _apply_update(state, named, req.get("weight_version"))


def _memory_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/release_memory_occupation")
    def release(req: dict[str, Any] = Body(default={})) -> Any:
        # Tags as SGLang's: "weights" frees the parameters ("kv_cache" holds nothing here,
        # the cache lives only inside one /generate call). None / [] means every tag.
        tags = (req or {}).get("tags") or list(_TAGS)
        unknown = sorted(set(tags) - set(_TAGS))
        if unknown:
            return _error(f"unknown memory tags {unknown}; use {list(_TAGS)}")
        with state.locked():
            if "weights" in tags and "weights" not in state.released_tags:
                state.released_shapes = {n: p.shape for n, p in state.params().items()}
                for p in state.params().values():
                    p.data = torch.empty(0)
            state.released_tags |= set(tags)
            state.release_count += 1
        return None

    @app.post("/resume_memory_occupation")
    def resume_memory(req: dict[str, Any] = Body(default={})) -> Any:
        tags = (req or {}).get("tags") or list(_TAGS)
        with state.locked():
            missing = sorted(set(tags) - state.released_tags)
            if missing:
                # SGLang 0.5.23's scheduler dies on this (KeyError in offload_tags.remove).
                return _error(f"cannot resume memory tags {missing}: they were not released "
                              f"(released: {sorted(state.released_tags)}); resume only what "
                              "/release_memory_occupation released")
            if "weights" in tags:
                # Like SGLang without a CPU backup: memory is back, its content is not; the
                # trainer pushes the weights next.
                for n, p in state.params().items():
                    p.data = torch.zeros(state.released_shapes[n])
            state.released_tags -= set(tags)
        return None


def _apply_update(state: ServerState, named: list[tuple[str, torch.Tensor]], version: Any) -> Any:
    with state.locked():
        error = _load(state, named)
        if error:
            return _fail(error)
        if version is not None:
            state.weight_version = str(version)
    return {"success": True, "message": f"Succeeded to update parameter online ({len(named)} tensors)."}


def _load(state: ServerState, named: list[tuple[str, torch.Tensor]]) -> str | None:
    params = state.params()
    for name, tensor in named:
        target = params.get(name)
        if target is None:
            return f"unknown tensor {name!r}; expected HF Qwen2 names such as {next(iter(params))!r}"
        if tuple(target.shape) != tuple(tensor.shape):
            return f"tensor {name!r}: shape {tuple(tensor.shape)} != model's {tuple(target.shape)}"
    with torch.no_grad():
        for name, tensor in named:
            params[name].copy_(tensor.to(params[name].dtype))
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="CPU rollout server with SGLang's HTTP API")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--fd", type=int, help="serve on this inherited socket, bound to --port (not SGLang's)")
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32"])
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (as SGLang)")
    d = Limits()
    ap.add_argument("--max-sequences", type=int, default=d.max_sequences, help=Limits.__doc__)
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    ap.add_argument("--lock-timeout-s", type=float, default=d.lock_timeout_s)
    ap.add_argument("--weight-sync-hosts", default=",".join(d.weight_sync_hosts),
                    help="comma-separated trainer addresses /init_weights_update_group may dial")
    ap.add_argument("--weight-sync-timeout-s", type=float, default=d.weight_sync_timeout_s)
    a = ap.parse_args(argv)
    if a.tp_size != 1:
        raise SystemExit(f"--tp-size {a.tp_size}: the CPU server runs tp 1; use sglang on GPU for more")
    torch.set_num_threads(a.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cpu_server: %(message)s")
    limits = Limits(a.max_sequences, a.max_body_bytes, a.lock_timeout_s,
                    tuple(h for h in a.weight_sync_hosts.split(",") if h), a.weight_sync_timeout_s)
    state = ServerState(a.model_path, a.random_seed, a.api_key, limits)
    config = uvicorn.Config(build_app(state), host=a.host, port=a.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    here = "127.0.0.1" if a.host in ("0.0.0.0", "") else a.host
    threading.Thread(target=warm_up, args=(f"http://{here}:{a.port}", state.api_key, state.started),
                     daemon=True).start()
    sockets = [socket.socket(fileno=a.fd)] if a.fd is not None else None
    StoppableServer(config, state.abort, state.running).run(sockets=sockets)


if __name__ == "__main__":
    main()
