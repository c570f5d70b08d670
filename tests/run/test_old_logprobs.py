"""Old log-probs reach the loss: over several optimizer steps on one rollout, the ratio, clip
fraction, approximate KL, loss and the trainer-vs-rollout gap match an independent
transformers computation against the policy's log-probs before the first step."""

from __future__ import annotations

import pytest
import torch

from megatron_qae.model import qwen2_mapping as qm
from testsupport import tiny

WORKER = tiny.ROOT / "tests" / "dist_workers" / "train_worker.py"
STEPS = 4
LR = 5e-2


def _hf_logprobs(params: dict[str, torch.Tensor], hf: dict) -> list[torch.Tensor]:
    """Per sample: log p(response token) under transformers' Qwen2 with `params` (megatron names)."""
    model = tiny.tiny_hf_model(hf)
    state = {k: v for name, t in params.items() for k, v in qm.megatron_to_hf(name, t, hf)}
    model.load_state_dict(state, strict=True)
    samples, _ = tiny.synthetic_samples()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
            p = len(s.prompt_ids)
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            out.append(logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]])
    return out


def _expected(lp: list[torch.Tensor], old: list[torch.Tensor], advs: list[float]) -> dict[str, float]:
    """The DAPO loss terms written out here (clip 0.2 / 0.28, dual clip 10)."""
    clip = kl = ratio_sum = loss = 0.0
    tokens = sum(x.numel() for x in lp)
    for new, before, a in zip(lp, old, advs):
        ratio = torch.exp(new - before)
        unclipped, clipped = -a * ratio, -a * ratio.clamp(0.8, 1.28)
        pg = torch.maximum(unclipped, clipped)
        if a < 0:
            pg = torch.minimum(pg, torch.full_like(pg, -a * 10.0))
        clip += float((clipped > unclipped).sum())
        kl += float((before - new).sum())
        ratio_sum += float(ratio.sum())
        loss += float(pg.sum())
    return {"loss/pg_clip_frac": clip / tokens, "loss/approx_kl": kl / tokens,
            "loss/ratio": ratio_sum / tokens, "loss/loss": loss / tokens}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("old_lp") / "run")
    # Log-prob chunks of 5 tokens: several per micro-batch, each recomputed in backward.
    tiny.torchrun(WORKER, 1, ["--mini-steps", str(STEPS), "--lr", str(LR), "--max-tokens", "64",
                              "--chunk-tokens", "5", "--out", out])
    return torch.load(f"{out}.mt64.pp0.pt", weights_only=False)


def test_every_step_uses_the_rollout_old_logprobs(run):
    hf = tiny.tiny_hf_config()
    samples, advs = tiny.synthetic_samples()
    assert run["micro_batches"] >= 3  # several device copies per step
    history = run["history"]
    old = _hf_logprobs(history[0]["params"], hf)
    clip_fracs = []
    for k, entry in enumerate(history):
        want = _expected(_hf_logprobs(entry["params"], hf), old, advs)
        got = entry["metrics"]
        for name, value in want.items():
            assert abs(got[name] - value) < 2e-5, (k, name, got[name], value)
        clip_fracs.append(got["loss/pg_clip_frac"])
    assert clip_fracs[0] == 0.0 and abs(history[0]["metrics"]["loss/ratio"] - 1.0) < 1e-6
    # Later steps really move away from the old policy and get clipped.
    assert max(clip_fracs[1:]) > 0.05, clip_fracs
    assert abs(history[-1]["metrics"]["loss/ratio"] - 1.0) > 1e-2


def test_logprob_gap_is_measured_against_the_old_logprobs(run):
    hf = tiny.tiny_hf_config()
    samples, _ = tiny.synthetic_samples()
    old = _hf_logprobs(run["history"][0]["params"], hf)
    gaps = [(lp - torch.tensor(s.rollout_logprobs, dtype=torch.float64)).abs() for lp, s in zip(old, samples)]
    want = float(sum(g.sum() for g in gaps)) / sum(g.numel() for g in gaps)
    assert want > 0.1
    assert abs(run["gap"] - want) < 1e-5
