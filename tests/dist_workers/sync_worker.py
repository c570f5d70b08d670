"""torchrun worker: push the trainer's weights to a CPU rollout server, sample from it, and
recompute the sampled tokens' log-probs with the Megatron policy.

Rank 0 starts the server (a subprocess speaking SGLang's HTTP API), all ranks join the weight
push; rank 0 writes {rollout log-probs, trainer log-probs, engine weight version}.
`--corrupt` swaps gate/up in the HF mapping on the way out: the comparison must then fail.
"""

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae import parallel, qwen2_mapping, weight_sync, weights  # noqa: E402
from megatron_qae.batching import build_micro_batch  # noqa: E402
from megatron_qae.policy import build_policy  # noqa: E402
from megatron_qae.train_step import compute_logprobs  # noqa: E402
from rollout_sglang.client import SGLangClient  # noqa: E402
from rollout_sglang.types import Sample  # noqa: E402
from tests import tiny  # noqa: E402


def corrupt_mapping() -> None:
    original = qwen2_mapping.megatron_to_hf

    def swapped(name, tensor, hf):
        out = original(name, tensor, hf)
        if name.endswith("mlp.linear_fc1.weight"):
            (g_name, g), (u_name, u) = out
            return [(g_name, u), (u_name, g)]
        return out

    weight_sync.qm.megatron_to_hf = swapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--url", required=True)
    ap.add_argument("--corrupt", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.corrupt:
        corrupt_mapping()
    groups = parallel.init_distributed(lambda w: parallel.ParallelDims.from_world(w, a.tp, a.pp))
    hf = tiny.tiny_hf_config()
    policy = build_policy(tiny.run_config(a.tp, a.pp), hf, groups, total_steps=1)
    weights.load_hf_state(policy.chunks, tiny.tiny_hf_model(hf, seed=7).state_dict(), hf,
                          groups.tp_rank, a.tp)
    link = None
    if dist.get_rank() == 0:
        link = weight_sync.connect_engines([(a.url, 1)], "127.0.0.1", tiny.free_port(), "gloo", 60.0)
    times = weight_sync.push_weights(policy, link, version=3, bucket_bytes=4096)
    sample = [None]
    if dist.get_rank() == 0:
        client = SGLangClient(a.url, timeout_s=60.0)
        prompt = [5, 9, 11, 3]
        out = client.generate([prompt], {"temperature": 1.0, "max_new_tokens": 12}, return_logprob=True)[0]
        sample = [(prompt, out.output_ids, out.output_logprobs, client.get_weight_version())]
    dist.broadcast_object_list(sample, src=0)
    prompt, ids, rollout_lp, version = sample[0]
    s = Sample(0, tuple(prompt), tuple(ids), tuple(rollout_lp), "stop", 0.0, 0.0, 3)
    mb = build_micro_batch([s], [0], [0.0])
    compute_logprobs(policy, [mb])
    if groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0:
        mask = mb.loss_mask[0].bool()
        Path(a.out).write_text(json.dumps({
            "rollout": rollout_lp, "trainer": mb.old_logprobs[0][mask].tolist(),
            "engine_version": version, "sync": times.metrics() if link else {},
        }))
    if link is not None:
        weight_sync.disconnect(link)
    parallel.destroy()


if __name__ == "__main__":
    main()
