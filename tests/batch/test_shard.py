"""Rank 0's per-DP-rank shards (batch/shard.py `build_shards`), in one process.

The shard tensors, built from flat numpy conversions of the samples' tuples, equal bit for bit
tensors built by `torch.tensor` from Python lists of every element on the independent path
(single-process advantages, then `batching.dispatch` per mini-batch), for every DP size, with
and without the zero-advantage skip; the micro-batches built from every rank's shard equal
those built from the whole batch (`rank_micro_batches`), skip metrics included; the DP ranks
together pass every (group, score) pair to the advantage reduction exactly once; the wire
payload round-trips and its bytes are the fields' bytes; empty shards (every sample skipped, no
mini-batch at all) and a token id beyond int32 behave as before. The scatter and the
DP-aware advantages across ranks: tests/batch/test_shard_dist.py under torchrun."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_qae.algorithm.advantage import compute_group_advantages
from megatron_qae.batch import shard as sh
from megatron_qae.batch.batching import dispatch, rank_micro_batches
from megatron_qae.config.algo import AlgoConfig
from rollout_sglang.types import Sample
from testsupport.tiny import synthetic_batch

ALGO = AlgoConfig()
PER_MINI = 8
TENSORS = ("tokens", "position_ids", "targets", "loss_mask", "advantages", "rollout_logprobs")


def _single_process_advantages(samples: list[Sample], algo: AlgoConfig = ALGO) -> list[float]:
    adv, _ = compute_group_advantages(torch.tensor([s.reward for s in samples], dtype=torch.float32),
                                      torch.tensor([s.group_id for s in samples]),
                                      quantile_k=algo.effective_quantile_k, quantile_method=algo.quantile_method,
                                      norm_by_std=algo.norm_adv_by_std, eps=algo.adv_eps)
    return adv.tolist()


def _samples(dp: int) -> list[Sample]:
    # Binary rewards in groups of 4: many groups all right or all wrong, so many exact zeros.
    return synthetic_batch(prompts=6, n=4, prompt_tokens=9, max_response=40, seed=dp).samples


def _by_lists(samples: list[Sample], skip_zero: bool, dp: int) -> list[dict[str, torch.Tensor]]:
    """The reference shard fields, every tensor from a Python list of its elements."""
    advantages = _single_process_advantages(samples)
    rows: list[list[tuple[int, int]]] = [[] for _ in range(dp)]
    for k, lo in enumerate(range(0, len(samples), PER_MINI)):
        part = samples[lo: lo + PER_MINI]
        for rank, mine in enumerate(dispatch([s.num_tokens for s in part], advantages[lo: lo + PER_MINI], dp,
                                             skip_zero)):
            rows[rank] += [(k, j) for j in mine]
    out = []
    for share in rows:
        picked = [samples[k * PER_MINI + j] for k, j in share]
        out.append({"mini_batch": torch.tensor([k for k, _ in share], dtype=torch.int64),
                    "index": torch.tensor([j for _, j in share], dtype=torch.int64),
                    "prompt_tokens": torch.tensor([len(s.prompt_ids) for s in picked], dtype=torch.int64),
                    "response_tokens": torch.tensor([len(s.response_ids) for s in picked], dtype=torch.int64),
                    "group_ids": torch.tensor([s.group_id for s in picked], dtype=torch.int64),
                    "token_ids": torch.tensor([t for s in picked for t in s.prompt_ids + s.response_ids],
                                              dtype=torch.int32),
                    "rollout_logprobs": torch.tensor([x for s in picked for x in s.rollout_logprobs],
                                                     dtype=torch.float32),
                    "scores": torch.tensor([s.reward for s in picked], dtype=torch.float32)})
    return out


@pytest.mark.parametrize("dp", [1, 2, 3])
@pytest.mark.parametrize("skip_zero", [True, False])
def test_shard_tensors_equal_the_list_built_ones(dp, skip_zero):
    samples = _samples(dp)
    got = sh.build_shards(samples, ALGO, PER_MINI, skip_zero, dp)
    want = _by_lists(samples, skip_zero, dp)
    assert len(got) == len(want) == dp
    for mine, ref in zip(got, want):
        for name, t in ref.items():
            assert getattr(mine, name).dtype == t.dtype and torch.equal(getattr(mine, name), t), name
        assert mine.mini_batch_samples.tolist() == [8, 8, 8]
        assert mine.mini_batch_response_tokens.tolist() == [
            sum(len(s.response_ids) for s in samples[lo: lo + PER_MINI]) for lo in (0, 8, 16)]
    assert sum(s.token_ids.numel() for s in got) > 0


@pytest.mark.parametrize("dp", [1, 2, 3])
@pytest.mark.parametrize("skip_zero", [True, False])
def test_micro_batches_from_shards_equal_those_from_the_whole_batch(dp, skip_zero):
    samples = _samples(dp)
    advantages = _single_process_advantages(samples)
    assert 0.0 in advantages and any(a != 0.0 for a in advantages)
    for rank, shard in enumerate(sh.build_shards(samples, ALGO, PER_MINI, skip_zero, dp)):
        at = (shard.mini_batch * PER_MINI + shard.index).tolist()
        plans = sh.shard_micro_batches(shard, torch.tensor([advantages[i] for i in at]), 64, 16, 1)
        assert len(plans) == 3
        for k, plan in enumerate(plans):
            lo = k * PER_MINI
            whole, metrics = rank_micro_batches(samples[lo: lo + PER_MINI], advantages[lo: lo + PER_MINI], rank, dp,
                                                64, skip_zero, 16, 1)
            assert plan.metrics == metrics
            assert plan.samples == PER_MINI
            assert plan.response_tokens == sum(len(s.response_ids) for s in samples[lo: lo + PER_MINI])
            assert len(plan.micro_batches) == len(whole)
            for a, b in zip(plan.micro_batches, whole):
                assert a.sample_index == b.sample_index
                assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in TENSORS)


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_every_pair_reaches_the_reduction_once_and_skipped_ones_are_zero(dp):
    samples = _samples(dp)
    advantages = _single_process_advantages(samples)
    shards = sh.build_shards(samples, ALGO, PER_MINI, True, dp)
    pairs = sorted((g, s) for x in shards for g, s in zip(torch.cat([x.group_ids, x.skipped_group_ids]).tolist(),
                                                          torch.cat([x.scores, x.skipped_scores]).tolist()))
    want = sorted((s.group_id, float(torch.tensor(s.reward, dtype=torch.float32))) for s in samples)
    assert pairs == want
    skipped = sum(x.skipped_scores.numel() for x in shards)
    assert skipped == sum(a == 0.0 for a in advantages) > 0
    assert all(x.mini_batch_skipped_samples.sum().item() == skipped for x in shards)
    for x in shards:  # what rank 0 trains is exactly the non-zero advantages
        at = (x.mini_batch * PER_MINI + x.index).tolist()
        assert all(advantages[i] != 0.0 for i in at)


def test_payload_round_trips_and_counts_the_fields_bytes():
    for shard in sh.build_shards(_samples(2), ALGO, PER_MINI, True, 2):
        sizes, payload = sh._payload(shard)
        assert payload.dtype == torch.uint8
        fields = [getattr(shard, f.name) for f in dataclasses.fields(shard)]
        assert payload.numel() == sum(t.numel() * t.element_size() for t in fields)
        assert shard.token_ids.element_size() == 4  # int32 on the wire
        back = sh._from_payload(sizes, payload)
        for f in dataclasses.fields(shard):
            a, b = getattr(shard, f.name), getattr(back, f.name)
            assert a.dtype == b.dtype and torch.equal(a, b), f.name


def test_a_rank_with_no_samples_gets_empty_tensors():
    samples = synthetic_batch(prompts=1, n=2, prompt_tokens=3, max_response=10).samples
    samples = [dataclasses.replace(s, reward=1.0) for s in samples]  # one score: advantages all 0.0
    shards = sh.build_shards(samples, ALGO, 2, True, 2)
    for shard in shards:
        assert shard.token_ids.numel() == 0 and shard.rollout_logprobs.numel() == 0 and shard.scores.numel() == 0
        assert shard.num_mini_batches == 1
        back = sh._from_payload(*sh._payload(shard))
        assert back.token_ids.numel() == 0 and back.token_ids.dtype == torch.int32
        plans = sh.shard_micro_batches(shard, torch.zeros(0), 64)
        assert len(plans) == 1 and len(plans[0].micro_batches) == 1
        assert plans[0].micro_batches[0].loss_mask.sum() == 0  # all-masked: keeps the rank in step
    assert sum(s.skipped_scores.numel() for s in shards) == 2
    assert [s.skipped_scores.numel() for s in shards] == [1, 1]


def test_no_mini_batch_when_dynamic_sampling_kept_nothing():
    for shard in sh.build_shards([], ALGO, 4, True, 2):
        assert shard.num_mini_batches == 0
        adv, metrics = sh.shard_advantages(shard, ALGO, None)  # no collective: every rank has none
        assert adv.numel() == 0 and metrics == {}
        assert sh.shard_micro_batches(shard, adv, 64) == []


def test_a_token_id_beyond_int32_is_refused():
    (s, *_) = synthetic_batch(prompts=1, n=1, prompt_tokens=3, max_response=10).samples
    big = dataclasses.replace(s, response_ids=(2**31, *s.response_ids[1:]))
    with pytest.raises(OverflowError):
        sh.build_shards([big], ALGO, 1, True, 1)
