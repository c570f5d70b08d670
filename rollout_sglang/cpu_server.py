"""A CPU rollout server that speaks SGLang's HTTP API, generating with transformers.

What it does: serves /generate (token ids in, token ids and per-token log-probs out; batched
sampling with temperature / top-p / top-k / stop tokens and a KV cache), receives weights
from the trainer exactly as SGLang does (/init_weights_update_group joins a standalone
torch.distributed group, gloo here instead of NCCL; /update_weights_from_distributed receives
tensors by broadcast from rank 0 and loads them by HF name), and implements pause / continue,
memory release / resume, flush_cache, health, weight version and get_weights_by_name;
/update_weights_from_tensor takes SGLang's payload (tensors by shared-memory handle). What it
does not: paged attention, continuous batching or any GPU feature: it exists so the trainer's
client and weight-sync path run for real on a CPU-only machine.

    python -m rollout_sglang.cpu_server --model-path DIR --host 127.0.0.1 --port 30000
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from rollout_sglang.sampling import generate_batch
from rollout_sglang.tensor_payload import deserialize_named_tensors
from rollout_sglang.weight_group import init_weight_group

log = logging.getLogger("cpu_server")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServerState:
    """The model and everything the endpoints share, guarded by one lock."""

    def __init__(self, model_path: str, seed: int) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_path = model_path
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.running.set()
        self.abort = threading.Event()
        torch.manual_seed(seed)
        if any(Path(model_path).glob("*.safetensors")):
            self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
        else:  # the trainer pushes weights before the first rollout
            self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        self.model.eval()
        self.eos_ids = _eos_ids(self.model.config, model_path)
        self.weight_version = "0"
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.released: dict[str, torch.Size] | None = None
        self.release_count = 0

    def params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())


def _eos_ids(config, model_path: str) -> list[int]:
    ids = config.eos_token_id
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        import json

        ids = json.loads(gen.read_text()).get("eos_token_id", ids)
    if ids is None:
        return []
    return list(ids) if isinstance(ids, list) else [int(ids)]


def _fail(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    @app.get("/health_generate")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/get_model_info")
    def model_info() -> dict:
        return {"model_path": state.model_path, "is_generation": True}

    @app.get("/get_server_info")
    def server_info() -> dict:
        return {"model_path": state.model_path, "tp_size": 1, "backend": "cpu", "version": "cpu",
                "memory_release_count": state.release_count, "weights_released": state.released is not None}

    @app.get("/get_weight_version")
    def weight_version() -> dict:
        return {"weight_version": state.weight_version}

    @app.post("/generate")
    def generate(req: dict[str, Any] = Body(...)) -> Any:
        ids = req.get("input_ids")
        if not ids:
            return _fail("input_ids is required (token-in/token-out API); text input is not supported")
        single = isinstance(ids[0], int)
        rows = [ids] if single else ids
        params = dict(req.get("sampling_params") or {})
        n = int(params.pop("n", 1))
        rows = [r for r in rows for _ in range(n)]
        state.running.wait()
        with state.lock:
            if state.released is not None:
                return _fail("weights are released; call /resume_memory_occupation first", 503)
            outs = generate_batch(state.model, rows, params, state.eos_ids, state.abort)
        for o in outs:
            o["meta_info"]["weight_version"] = state.weight_version
        return outs[0] if single and n == 1 else outs

    @app.post("/init_weights_update_group")
    def init_group(req: dict[str, Any] = Body(...)) -> Any:
        try:
            group = init_weight_group(req["master_address"], int(req["master_port"]),
                                      int(req["rank_offset"]), int(req["world_size"]),
                                      req.get("group_name", "weight_update_group"), "gloo")
        except Exception as exc:  # noqa: BLE001 - reported to the trainer
            return _fail(f"init_weights_update_group failed: {exc}", 500)
        state.groups[req.get("group_name", "weight_update_group")] = group
        return {"success": True, "message": "joined"}

    @app.post("/update_weights_from_distributed")
    def update_distributed(req: dict[str, Any] = Body(...)) -> Any:
        group = state.groups.get(req.get("group_name", "weight_update_group"))
        if group is None:
            return _fail(f"no weight group {req.get('group_name')!r}; call /init_weights_update_group first")
        received = []
        # Receive everything before validating: the trainer is broadcasting all of it.
        for name, dtype, shape in zip(req["names"], req["dtypes"], req["shapes"]):
            buf = torch.empty(shape, dtype=_DTYPES[dtype])
            dist.broadcast(buf, src=0, group=group)
            received.append((name, buf))
        return _apply_update(state, received, req.get("weight_version"))

    @app.post("/update_weights_from_tensor")
    def update_tensor(req: dict[str, Any] = Body(...)) -> Any:
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

    @app.post("/get_weights_by_name")
    def weights_by_name(req: dict[str, Any] = Body(...)) -> Any:
        with state.lock:
            param = state.params().get(req.get("name", ""))
            if param is None:
                return _fail(f"unknown parameter {req.get('name')!r}")
            return param.detach().flatten()[: int(req.get("truncate_size", 100))].tolist()

    @app.post("/pause_generation")
    def pause(req: dict[str, Any] = Body(default={})) -> dict:
        state.running.clear()
        if (req or {}).get("mode", "abort") == "abort":
            state.abort.set()
        return {"success": True}

    @app.post("/continue_generation")
    def resume(req: dict[str, Any] = Body(default={})) -> dict:
        state.abort.clear()
        state.running.set()
        return {"success": True}

    @app.post("/release_memory_occupation")
    def release(req: dict[str, Any] = Body(default={})) -> dict:
        # Tags as SGLang's: "weights" frees the parameters ("kv_cache" holds nothing here,
        # the cache lives only inside one /generate call).
        tags = (req or {}).get("tags") or ["weights", "kv_cache"]
        with state.lock:
            if "weights" in tags and state.released is None:
                state.released = {n: p.shape for n, p in state.params().items()}
                for p in state.params().values():
                    p.data = torch.empty(0)
            state.release_count += 1
        return {"success": True}

    @app.post("/resume_memory_occupation")
    def resume_memory(req: dict[str, Any] = Body(default={})) -> dict:
        tags = (req or {}).get("tags") or ["weights", "kv_cache"]
        with state.lock:
            if "weights" in tags and state.released is not None:
                # Like SGLang without a CPU backup: memory is back, its content is not; the
                # trainer pushes the weights next.
                for n, p in state.params().items():
                    p.data = torch.zeros(state.released[n])
                state.released = None
        return {"success": True}

    @app.post("/flush_cache")
    @app.get("/flush_cache")
    def flush() -> dict:
        return {"success": True}

    return app


def _apply_update(state: ServerState, named: list[tuple[str, torch.Tensor]], version: Any) -> Any:
    with state.lock:
        error = _load(state, named)
        if error:
            return _fail(error)
        if version is not None:
            state.weight_version = str(version)
    return {"success": True, "message": f"loaded {len(named)} tensors"}


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
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32"])
    ap.add_argument("--num-threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.tp_size != 1:
        raise SystemExit(f"--tp-size {a.tp_size}: the CPU server runs tp 1; use sglang on GPU for more")
    torch.set_num_threads(a.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cpu_server: %(message)s")
    state = ServerState(a.model_path, a.random_seed)
    uvicorn.run(build_app(state), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
