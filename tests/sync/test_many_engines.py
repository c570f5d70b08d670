"""Weight pushes at the production shape's ratios, on CPU servers: two pipeline stages' senders
to three engines with buckets far smaller than a stage (hundreds of updates per push) reach
every engine in one order, however the posts are delayed, over several pushes; re-forming the
weight groups before every push leaves each engine holding one group, and none once the links
close; after an engine refuses mid-push, the next group's push reaches the engine that was
left receiving in the old one."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import torch

from megatron_qae.sync import weight_sync
from rollout_sglang.sglang.client import EngineError, SGLangClient
from testsupport import tiny
from testsupport.cpu_server import CpuServer, write_model_dir

WORKER = tiny.ROOT / "tests" / "dist_workers" / "sync_worker.py"
LAYERS = 16
"""Enough layers that a 4 KB bucket makes 66 buckets a push (x 3 engines: 198 updates)."""


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model_dir = write_model_dir(tmp_path_factory.mktemp("deep") / "model", tiny.tiny_hf_config(layers=LAYERS))
    servers = [CpuServer(model_dir) for _ in range(3)]
    with ExitStack() as stack, ThreadPoolExecutor(3) as pool:
        for server in servers:
            stack.push(server.__exit__)
        yield list(pool.map(CpuServer.__enter__, servers))


def _run(tmp_path, nproc: int, urls: list[str], args: list[str]) -> dict:
    out = tmp_path / "out.json"
    tiny.torchrun(WORKER, nproc, [*args, "--layers", str(LAYERS), "--urls", ",".join(urls), "--out", str(out)])
    return json.loads(out.read_text())


def _max_gap(engine: dict) -> float:
    assert len(engine["rollout"]) == len(engine["trainer"]) > 0
    return max(abs(a - b) for a, b in zip(engine["rollout"], engine["trainer"]))


def test_two_stages_reach_three_engines_in_one_order_with_posts_delayed(engines, tmp_path):
    """Each stage's sender posts to every engine; delayed at random, the posts of the two
    stages reach the engines in both orders. On the old code (stages posting side by side) the
    first push deadlocked: an engine receiving stage 0's bucket while another received stage
    1's, each broadcast waiting for the engine held by the other, until the 30 s timeout."""
    pushes = 3
    res = _run(tmp_path, 2, engines, ["--pp", "2", "--bucket-bytes", "4096", "--pushes", str(pushes),
                                      "--post-delay-s", "0.004", "--link-timeout-s", "30"])
    report = res["report"]
    assert report["failed"] == [None] * pushes
    assert report["posts_per_push"] >= 150  # hundreds of updates: 3 engines x 66 buckets (198)
    assert len(res["engines"]) == 3
    for engine in res["engines"].values():
        assert _max_gap(engine) < 1e-4 and engine["engine_version"] == str(pushes)
    # One group per stage's sender on every engine, none once the links are closed.
    assert all(len(held) == 2 for held in report["groups_held"].values()), report["groups_held"]
    assert all(held == [] for held in report["groups_after_close"].values()), report["groups_after_close"]


def test_reforming_before_every_push_leaves_one_group_on_each_engine(engines, tmp_path):
    pushes = 4
    res = _run(tmp_path, 1, engines, ["--bucket-bytes", str(1 << 20), "--pushes", str(pushes), "--reform"])
    report = res["report"]
    assert report["failed"] == [None] * pushes
    assert all(len(held) == 1 for held in report["groups_held"].values()), report["groups_held"]
    assert all(held == [] for held in report["groups_after_close"].values()), report["groups_after_close"]
    for engine in res["engines"].values():
        assert _max_gap(engine) < 1e-4 and engine["engine_version"] == str(pushes)


@pytest.mark.faults
def test_after_an_engine_refuses_mid_push_the_next_group_reaches_the_others(engines):
    """Engine B refuses a bucket (no session: a 400 before it joins the broadcast) while A
    receives it: the trainer's broadcasts to B never end, and A waits in the old group for
    the bucket's third tensor (gloo runs two broadcasts at a time), holding its one-update-
    at-a-time lock. The old code left that group undestroyed, so A's next update, on a new
    group, never started: its broadcast timed out in gloo (the SIGKILL fault test's 120 s).
    Aborting the trainer's side and destroying B's ends the old broadcasts; A takes the next
    group's update at once, and neither engine holds the old group."""
    a, b = SGLangClient(engines[0], timeout_s=60.0), SGLangClient(engines[1], timeout_s=60.0)
    link = weight_sync.connect_engines([(a.base_url, 1), (b.base_url, 1)], "127.0.0.1", "gloo", 20.0)
    bucket = [(f"model.layers.{i}.input_layernorm.weight", torch.full((32,), 0.5)) for i in range(4)]
    a.begin_weight_update()
    try:
        outcome = weight_sync._send_bucket(link, bucket, 8, weight_sync.SyncTimes(), flush=False)
        assert outcome.failed.startswith(f"engine {b.base_url} refused the weight update"), outcome.failed
        weight_sync.disconnect(link)  # as the re-forming does after a failed push
        fresh = weight_sync.connect_engines([(a.base_url, 1)], "127.0.0.1", "gloo", 20.0)
        try:
            t0 = time.monotonic()
            outcome = weight_sync._send_bucket(fresh, bucket, 9, weight_sync.SyncTimes(), flush=True)
            took_s = time.monotonic() - t0
        finally:
            weight_sync.disconnect(fresh)
    finally:
        a.end_weight_update()
    assert outcome.ok, outcome.failed
    assert took_s < 10.0 and a.weight_version() == "9"
    assert a.server_info()["weight_update_groups"] == b.server_info()["weight_update_groups"] == []


def test_an_update_with_no_reply_in_time_is_reported_as_a_timeout_not_a_refusal():
    """An engine that takes the request and never answers (here: a socket nobody reads)."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        client = SGLangClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        with pytest.raises(EngineError) as caught:
            client.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[32]], "g")
    assert caught.value.timed_out and caught.value.status is None
    message = weight_sync._failed(client, "the weight update", caught.value)
    assert message.startswith(f"engine {client.base_url} timed out on the weight update: ")
    assert "no reply within 0.5 s" in message and "refused" not in message
