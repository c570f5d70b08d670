"""The lean hand-off's per-DP-rank tensors (run/handoff.py `_train_tensors`), built from flat
numpy conversions of the samples' tuples, equal bit for bit the tensors `torch.tensor` builds
from Python lists of every element (the construction they replaced), for every DP size, with
and without the zero-advantage skip, empty shares included; and a token id beyond int32 is
refused as before. The micro-batches built from a share are checked against the whole batch
under torchrun in test_collectives.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from testsupport.tiny import synthetic_batch
from megatron_qae.batch import handoff
from megatron_qae.batch.batching import dispatch
from rollout_sglang.types import Sample


def _by_lists(samples: list[Sample], advantages: list[float], per_mini: int, skip_zero: bool,
              dp: int) -> list[list[torch.Tensor]]:
    """The reference: every tensor from a Python list of its elements."""
    rows: list[list[tuple[int, int]]] = [[] for _ in range(dp)]
    totals = []
    for k, lo in enumerate(range(0, len(samples), per_mini)):
        part = samples[lo: lo + per_mini]
        totals.append(sum(len(s.response_ids) for s in part))
        for rank, mine in enumerate(dispatch([s.num_tokens for s in part], advantages[lo: lo + per_mini], dp,
                                             skip_zero)):
            rows[rank] += [(k, j) for j in mine]
    out = []
    for share in rows:
        picked = [samples[k * per_mini + j] for k, j in share]
        out.append([torch.tensor([j for _, j in share], dtype=torch.int64),
                    torch.tensor([k for k, _ in share], dtype=torch.int64),
                    torch.tensor([len(s.prompt_ids) for s in picked], dtype=torch.int64),
                    torch.tensor([len(s.response_ids) for s in picked], dtype=torch.int64),
                    torch.tensor([t for s in picked for t in s.prompt_ids + s.response_ids], dtype=torch.int32),
                    torch.tensor([x for s in picked for x in s.rollout_logprobs], dtype=torch.float32),
                    torch.tensor(totals, dtype=torch.int64)])
    return out


@pytest.mark.parametrize("dp", [1, 2, 3])
@pytest.mark.parametrize("skip_zero", [True, False])
def test_share_tensors_equal_the_list_built_ones(dp, skip_zero):
    samples = synthetic_batch(prompts=6, n=4, prompt_tokens=9, max_response=40, seed=dp).samples
    advantages = [float((i % 5) - 2) * (i % 3 == 0) for i in range(len(samples))]  # most exact zeros
    got = handoff._train_tensors(samples, advantages, 8, skip_zero, dp)
    want = _by_lists(samples, advantages, 8, skip_zero, dp)
    assert len(got) == len(want) == dp
    for mine, ref in zip(got, want):
        assert [t.dtype for t in mine] == [t.dtype for t in ref]
        assert all(torch.equal(a, b) for a, b in zip(mine, ref))
    assert sum(t[4].numel() for t in got) > 0


def test_a_rank_with_no_samples_gets_empty_tensors():
    samples = synthetic_batch(prompts=1, n=2, prompt_tokens=3, max_response=10).samples
    got = handoff._train_tensors(samples, [0.0, 0.0], 2, True, 2)  # every sample skipped
    for mine, ref in zip(got, _by_lists(samples, [0.0, 0.0], 2, True, 2)):
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(mine, ref))
        assert mine[4].numel() == 0 and mine[5].numel() == 0


def test_a_token_id_beyond_int32_is_refused():
    (s, *_) = synthetic_batch(prompts=1, n=1, prompt_tokens=3, max_response=10).samples
    big = dataclasses.replace(s, response_ids=(2**31, *s.response_ids[1:]))
    with pytest.raises(OverflowError):
        handoff._train_tensors([big], [1.0], 1, True, 1)
