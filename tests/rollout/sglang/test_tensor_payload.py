"""The weight payload's unpickler against hostile payloads, and the real round trip it must keep.

Each hostile payload would run `touch <marker>` if it got through; the test asserts the load is
refused and the marker file was never created. The payloads are the dotted-name walk of
issue 28 (`torch._utils._rebuild_tensor.__builtins__.get` -> `eval`), the classic escapes
(`__reduce__` to os.system / eval / exec, copyreg's reconstructor and extension registry,
functools.partial, a nested pickle through pickle.loads) and opcodes a tensor dump never needs.
"""

from __future__ import annotations

import base64

import pytest
import torch

from rollout_sglang.sglang.tensor_payload import deserialize_named_tensors, pack_bucket, serialize_named_tensors
from testsupport.hostile_pickles import dotted_eval, dotted_eval_text_global, hostile_payloads


@pytest.mark.parametrize("kind", sorted(hostile_payloads("true")))
def test_hostile_payload_is_refused_and_runs_nothing(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = base64.b64encode(hostile_payloads(f"touch {marker}")[kind]).decode()
    with pytest.raises(ValueError) as refused:
        deserialize_named_tensors(payload)
    assert not marker.exists(), f"{kind} ran its command"
    assert "not a weight payload" in str(refused.value)


def test_refusal_names_the_global_or_opcode():
    with pytest.raises(ValueError, match=r"refused torch\._utils\._rebuild_tensor\.__builtins__\.get"):
        deserialize_named_tensors(base64.b64encode(dotted_eval("true")).decode())
    with pytest.raises(ValueError, match="refused opcode GLOBAL at byte 2"):
        deserialize_named_tensors(base64.b64encode(dotted_eval_text_global("true")).decode())


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
