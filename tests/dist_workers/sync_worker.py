"""torchrun worker: push the trainer's weights to CPU rollout servers, sample from each, and
recompute the sampled tokens' log-probs with the Megatron policy.

The test starts the servers (subprocesses speaking SGLang's HTTP API) and passes their URLs.
`--mode distributed`: rank 0 broadcasts over a weight group with every server;
`--mode colocated`: rank r sends its own tensors by shared-memory handle to server
r // engine_tp (with `--engine-tp 2` both ranks' entries are gathered into one request; the
CPU server, TP rank 0 of 1, loads entry 0).
`--kill-pid P` (distributed): server P is killed after the group is formed; the push must
report the failure without raising, and a group re-formed with the live servers must work.
`--signal-pid P --send-signal S` (distributed): server P gets signal S (SIGSTOP, SIGKILL) in the
middle of the push, right after every engine opened its weight-update session; the push must
fail within seconds naming it, and a group re-formed with the live servers must work.
`--link-timeout-s T` bounds the first weight group's collectives and replies (default 120 s):
the fault tests shorten it, since the broadcast abandoned to a stopped or killed server is only
released when that timeout passes (at the latest when the rank exits), and the live server
waits in it until then.
`--measure-memory` (distributed): the peak of the bytes torch's CPU allocator holds during the
push beyond what it held before, per rank (torch.profiler memory events).
`--pushes N` (distributed): versions 1..N pushed over stage links, the weights changed before
every push but the first, the links re-formed before every push with `--reform` (else after a
failed one, as the loop does); reports each push's failure and the weight groups each server
holds after the last push and after the links closed. `--post-delay-s D` makes every
/update_weights_from_distributed request wait a random time in [0, D] before it is posted
(the stages' posts then reach the engines in every order); the posts are counted.
`--corrupt` swaps gate/up in the HF mapping on the way out: the comparison must then fail.
`--api-key K` is sent with every request (the real SGLang server of the tier requires one).
Writes {url: {rollout, trainer, engine_version}} plus the sync report.
"""

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.model import parallel, qwen2_mapping, weights  # noqa: E402
from megatron_qae.config.sections import ParallelConfig  # noqa: E402

from megatron_qae.sync import weight_sync  # noqa: E402
from megatron_qae.batch.batching import build_micro_batch  # noqa: E402
from megatron_qae.sync.colocated_sync import ColocatedSync  # noqa: E402
from megatron_qae.model.policy import build_policy  # noqa: E402
from megatron_qae.run.train_step import compute_logprobs  # noqa: E402
from rollout_sglang.sglang.client import SGLangClient  # noqa: E402
from rollout_sglang.types import Sample  # noqa: E402
from testsupport import tiny  # noqa: E402


def corrupt_mapping() -> None:
    original = qwen2_mapping.megatron_to_hf

    def swapped(name, tensor, hf):
        out = original(name, tensor, hf)
        if name.endswith("mlp.linear_fc1.weight"):
            (g_name, g), (u_name, u) = out
            return [(g_name, u), (u_name, g)]
        return out

    qwen2_mapping.megatron_to_hf = swapped  # hf_buckets looks it up at each call


def _push(a, policy) -> dict:
    """Push version 3 as `a.mode` says; returns what the test checks about the push itself."""
    urls = a.urls.split(",")
    if a.mode == "colocated":
        sync = ColocatedSync(len(urls), a.engine_tp, 120.0, api_key=a.api_key)
        times, outcome = sync.push(policy, urls, version=3, bucket_bytes=a.bucket_bytes)
        oks = [None] * dist.get_world_size()
        dist.all_gather_object(oks, outcome.ok)
        return {"ok": oks, "bytes": times.bytes, "live": urls}
    if a.pushes:
        return _push_repeatedly(a, policy)
    links, report = weight_sync.StageLink(policy, "127.0.0.1"), {"live": urls}
    target = weight_sync.SyncTarget([(u, 1) for u in urls], "gloo", a.link_timeout_s, a.api_key, reform=False)
    link = links.prepare(target)
    if a.kill_pid and dist.get_rank() == 0:
        os.kill(a.kill_pid, signal.SIGKILL)
        time.sleep(0.5)
    if a.signal_pid:
        return _push_signalled(a, policy, link, urls)
    measured, outcome = _measured_push(a, policy, link)
    report.update(measured)
    if a.kill_pid:
        if dist.get_rank() == 0:
            report["failed"] = outcome.failed
            report["live"] = [u for u in urls if SGLangClient(u, timeout_s=5.0).health()]
        report["live"] = parallel.broadcast_from_driver(report["live"], policy.groups)
        target = weight_sync.SyncTarget([(u, 1) for u in report["live"]], "gloo", 120.0, a.api_key, reform=True)
        link = links.prepare(target)
        _, outcome = weight_sync.push_weights(policy, link, version=3, bucket_bytes=a.bucket_bytes)
    if link is not None:
        report["second_failed"] = outcome.failed
    links.close()
    holder = [report]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _count_and_delay_posts(max_delay_s: float) -> list[int]:
    """Every weight-update request of this process waits U(0, max_delay_s) before it is
    posted; returns the running count of posts."""
    rng, posts, post = random.Random(dist.get_rank()), [0], SGLangClient.update_weights_from_distributed

    def delayed(self, *args, **kwargs):
        posts[0] += 1
        time.sleep(rng.uniform(0.0, max_delay_s))
        return post(self, *args, **kwargs)

    SGLangClient.update_weights_from_distributed = delayed
    return posts


def _groups_held(urls: list[str]) -> dict[str, list[str]]:
    return {u: SGLangClient(u, timeout_s=30.0).server_info().get("weight_update_groups") for u in urls}


def _push_repeatedly(a, policy) -> dict:
    """Versions 1..a.pushes over stage links (see the module doc)."""
    urls, posts = a.urls.split(","), _count_and_delay_posts(a.post_delay_s)
    links, failed, last_failed = weight_sync.StageLink(policy, "127.0.0.1"), [], False
    for version in range(1, a.pushes + 1):
        if version > 1:
            with torch.no_grad():
                for param in (p for chunk in policy.chunks for p in chunk.parameters()):
                    param.mul_(0.97)
        target = weight_sync.SyncTarget([(u, 1) for u in urls], "gloo", a.link_timeout_s, a.api_key,
                                        reform=a.reform or last_failed)
        t0 = time.monotonic()
        _, outcome = weight_sync.push_weights(policy, links.prepare(target), version, a.bucket_bytes)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (outcome.failed, time.monotonic() - t0))
        failed.append(next((f for f, _ in every if f), None))
        last_failed = failed[-1] is not None
    report = {"live": urls, "failed": failed, "posts_per_push": posts[0] / a.pushes}
    dist.barrier()
    report["groups_held"] = _groups_held(urls) if dist.get_rank() == 0 else None
    links.close()
    dist.barrier()
    report["groups_after_close"] = _groups_held(urls) if dist.get_rank() == 0 else None
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, report)
    # Each stage's sender counts its own posts; rank 0 reports the servers.
    return {**every[0], "posts_per_push": sum(r["posts_per_push"] for r in every)}


def _push_signalled(a, policy, link, urls: list[str]) -> dict:
    """The push, with server `a.signal_pid` signalled once the sessions are open; then a
    push to the servers that still answer /health."""
    report, sent = {"live": urls}, {}
    if dist.get_rank() == 0:
        open_sessions = weight_sync._open_sessions

        def open_then_signal(link):
            opened_and_outcome = open_sessions(link)
            os.kill(a.signal_pid, a.send_signal)
            sent["at"] = time.monotonic()
            return opened_and_outcome

        weight_sync._open_sessions = open_then_signal
    _, outcome = weight_sync.push_weights(policy, link, version=3, bucket_bytes=4096)
    if dist.get_rank() == 0:
        weight_sync._open_sessions = open_sessions
        report.update(failed=outcome.failed, hung=sorted(outcome.hung),
                      failed_after_s=time.monotonic() - sent["at"])
        weight_sync.disconnect(link)
        report["live"] = [u for u in urls if SGLangClient(u, timeout_s=5.0).health(timeout_s=3.0)]
        link = weight_sync.connect_engines([(u, 1) for u in report["live"]], "127.0.0.1",
                                           "gloo", 120.0, a.api_key)
    _, outcome = weight_sync.push_weights(policy, link, version=3, bucket_bytes=4096)
    if link is not None:
        report["second_failed"] = outcome.failed
        weight_sync.disconnect(link)
    holder = [report]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _measured_push(a, policy, link) -> tuple[dict, weight_sync.PushOutcome]:
    """Push version 3 (returns its outcome too); with `--measure-memory` also the peak of the
    bytes torch's allocator holds beyond what it held before the push (every allocation and
    free, in order), on every rank, with this rank's stage size and its largest full tensor."""
    if not a.measure_memory:
        return {}, weight_sync.push_weights(policy, link, version=3, bucket_bytes=a.bucket_bytes)[1]
    from testsupport.measure import peak_allocated_bytes

    pushed = {}

    def push() -> None:
        pushed["outcome"] = weight_sync.push_weights(policy, link, version=3, bucket_bytes=a.bucket_bytes)[1]

    peak = peak_allocated_bytes(push)
    specs = weights.full_param_specs(policy.chunks, policy.groups.dims.tp)
    sizes = [s.numel() * torch.empty((), dtype=d).element_size() for _, s, d in specs]
    mine = {"peak_bytes": peak, "stage_bytes": sum(sizes), "largest_bytes": max(sizes)}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"memory": every}, pushed["outcome"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--urls", required=True)
    ap.add_argument("--mode", choices=["distributed", "colocated"], default="distributed")
    ap.add_argument("--engine-tp", type=int, default=1)
    ap.add_argument("--kill-pid", type=int, default=0)
    ap.add_argument("--signal-pid", type=int, default=0)
    ap.add_argument("--send-signal", type=int, default=int(signal.SIGKILL))
    ap.add_argument("--corrupt", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bucket-bytes", type=int, default=4096)
    ap.add_argument("--measure-memory", action="store_true")
    ap.add_argument("--link-timeout-s", type=float, default=120.0)
    ap.add_argument("--pushes", type=int, default=0)
    ap.add_argument("--reform", action="store_true")
    ap.add_argument("--post-delay-s", type=float, default=0.0)
    a = ap.parse_args()
    if a.corrupt:
        corrupt_mapping()
    groups = parallel.init_distributed(ParallelConfig(tp=a.tp, pp=a.pp))
    hf = tiny.tiny_hf_config(layers=a.layers)
    policy = build_policy(tiny.run_config(a.tp, a.pp), hf, groups, total_steps=1)
    weights.load_hf_state(policy, tiny.tiny_hf_model(hf, seed=7).state_dict())
    report = _push(a, policy)
    samples = [None]
    if dist.get_rank() == 0:
        prompt, found = [5, 9, 11, 3], {}
        for url in report["live"]:
            client = SGLangClient(url, timeout_s=120.0, api_key=a.api_key)
            out = client.generate([prompt], {"temperature": 1.0, "max_new_tokens": 12}, return_logprob=True)[0]
            found[url] = (prompt, out.output_ids, out.output_logprobs, client.weight_version())
        samples = [found]
    dist.broadcast_object_list(samples, src=0)
    results = {}
    for url, (prompt, ids, rollout_lp, version) in samples[0].items():
        mb = build_micro_batch([Sample(0, tuple(prompt), tuple(ids), tuple(rollout_lp), "stop", 0.0, 0.0, 3)],
                               [0], [0.0])
        trainer_lp = compute_logprobs(policy, [mb])[0]
        if groups.is_last_stage:
            mask = mb.loss_mask[0].bool()
            results[url] = {"rollout": rollout_lp, "trainer": trainer_lp[0][mask].tolist(),
                            "engine_version": version}
    if groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0:
        Path(a.out).write_text(json.dumps({"engines": results, "report": report}))
    parallel.destroy()


if __name__ == "__main__":
    main()
