"""The weight payload's unpickler against hostile payloads, and the real round trip it must keep.

Each hostile payload would run `touch <marker>` if it got through; the test asserts the load is
refused and the marker file was never created. The payloads are the dotted-name walk of
issue 28 (`torch._utils._rebuild_tensor.__builtins__.get` -> `eval`), the classic escapes
(`__reduce__` to os.system / eval / exec, copyreg's reconstructor and extension registry,
functools.partial, a nested pickle through pickle.loads) and opcodes a tensor dump never needs.
"""

from __future__ import annotations

import base64
import builtins
import copyreg
import functools
import os
import pickle

import pytest
import torch

from rollout_sglang.sglang.tensor_payload import deserialize_named_tensors, pack_bucket, serialize_named_tensors


def _str(s: str) -> bytes:
    data = s.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"


def _call1(arg: str) -> bytes:
    return _str(arg) + b"\x85R"  # TUPLE1, REDUCE


def _dotted_eval(command: str) -> bytes:
    """The probe's payload: dict.get of the builtins reached by attribute walk, then eval."""
    code = f"__import__('os').system({command!r})"
    return (b"\x80\x04" + _stack_global("torch._utils", "_rebuild_tensor.__builtins__.get")
            + _call1("eval") + _call1(code) + b".")


def _dotted_eval_text_global(command: str) -> bytes:
    """The same walk through the protocol 0-3 GLOBAL opcode inside a protocol 4 stream."""
    code = f"__import__('os').system({command!r})"
    return (b"\x80\x04" + b"ctorch._utils\n_rebuild_tensor.__builtins__.get\n"
            + _call1("eval") + _call1(code) + b".")


def _dotted_from_allowed_name(command: str) -> bytes:
    """The same walk from a function a tensor dump does name (reductions.rebuild_tensor)."""
    code = f"__import__('os').system({command!r})"
    return (b"\x80\x04" + _stack_global("torch.multiprocessing.reductions", "rebuild_tensor.__builtins__.get")
            + _call1("eval") + _call1(code) + b".")


def _dotted_module_attribute(command: str) -> bytes:
    """A module the dump names, walked to a module it imports: reductions.os.system."""
    return b"\x80\x04" + _stack_global("torch.multiprocessing.reductions", "os.system") + _call1(command) + b"."


class _Reduce:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _reduce_payloads(command: str) -> dict[str, bytes]:
    code = f"__import__('os').system({command!r})"
    inner = pickle.dumps([("w", _Reduce(os.system, command))])
    return {
        "reduce_os_system": pickle.dumps([("w", _Reduce(os.system, command))]),
        "reduce_eval": pickle.dumps([("w", _Reduce(builtins.eval, code))]),
        "reduce_exec": pickle.dumps([("w", _Reduce(builtins.exec, code))]),
        "copyreg_reconstructor": pickle.dumps(
            [("w", _Reduce(copyreg._reconstructor, _Reduce, object, None))], protocol=2),
        "functools_partial": pickle.dumps([("w", _Reduce(functools.partial(os.system, command)))]),
        "nested_pickle_loads": pickle.dumps([("w", _Reduce(pickle.loads, inner))]),
        "protocol0_global": pickle.dumps([("w", _Reduce(os.system, command))], protocol=0),
    }


def _extension_payload(command: str) -> bytes:
    """os.system by copyreg's extension registry (the EXT1 opcode, no name in the stream)."""
    copyreg.add_extension("posix", "system", 0xF0)
    try:
        return pickle.dumps([("w", _Reduce(os.system, command))], protocol=2)
    finally:
        copyreg.remove_extension("posix", "system", 0xF0)


def _hostile(command: str) -> dict[str, bytes]:
    return {
        "dotted_builtins_eval": _dotted_eval(command),
        "dotted_builtins_eval_text_global": _dotted_eval_text_global(command),
        "dotted_from_allowed_name": _dotted_from_allowed_name(command),
        "dotted_module_attribute": _dotted_module_attribute(command),
        **_reduce_payloads(command),
        "copyreg_extension": _extension_payload(command),
        "build_opcode": b"\x80\x04" + _stack_global("torch", "Tensor") + b")\x81}b.",
        "trailing_bytes": pickle.dumps([]) + _dotted_eval(command),
    }


@pytest.mark.parametrize("kind", sorted(_hostile("true")))
def test_hostile_payload_is_refused_and_runs_nothing(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = base64.b64encode(_hostile(f"touch {marker}")[kind]).decode()
    with pytest.raises(ValueError) as refused:
        deserialize_named_tensors(payload)
    assert not marker.exists(), f"{kind} ran its command"
    assert "not a weight payload" in str(refused.value)


def test_refusal_names_the_global_or_opcode():
    with pytest.raises(ValueError, match=r"refused torch\._utils\._rebuild_tensor\.__builtins__\.get"):
        deserialize_named_tensors(base64.b64encode(_dotted_eval("true")).decode())
    with pytest.raises(ValueError, match="refused opcode GLOBAL at byte 2"):
        deserialize_named_tensors(base64.b64encode(_dotted_eval_text_global("true")).decode())


def test_tensors_of_each_dtype_and_views_round_trip_exactly():
    base = torch.randn(6, 8)
    named = [
        ("f32", torch.randn(3, 5)),
        ("bf16", torch.randn(7).to(torch.bfloat16)),
        ("f16_transposed", torch.randn(4, 3).to(torch.float16).t()),
        ("i64_strided", torch.arange(20, dtype=torch.int64)[::3]),
        ("i32", torch.arange(5, dtype=torch.int32)),
        ("u8", torch.arange(9, dtype=torch.uint8).reshape(3, 3)),
        ("bool", torch.tensor([True, False, True])),
        ("column_slice", base[:, 2:5]),
        ("offset_view", base[3:]),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.empty(0, 4)),
    ]
    for payload in (named, pack_bucket(named)):
        back = deserialize_named_tensors(serialize_named_tensors(payload))
        assert [n for n, _ in back] == [n for n, _ in payload]
        for (_, want), (name, got) in zip(payload, back):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.stride() == want.stride(), name
            assert torch.equal(got, want), name
