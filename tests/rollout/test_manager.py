"""RolloutManager on a local Ray with real CPU engines: dynamic sampling and engine failure."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from megatron_qae.config.loading import load_config
from rollout_sglang import demo_task
from rollout_sglang.manager import RolloutManager, group_accuracy_histogram, select_groups
from rollout_sglang.sglang.client import EngineError
from rollout_sglang.types import Group, Prompt, Sample
from testsupport.ray_local import local_ray


def _group(gid: int, accs: list[float]) -> Group:
    p = Prompt(gid, (1, 2), "1")
    return Group(gid, p, tuple(Sample(gid, (1, 2), (3,), (-1.0,), "stop", 2 * a - 1, a, 0) for a in accs))


def test_group_accuracy_histogram_counts_each_group_once_with_exact_ends():
    # mean accuracies 0, 0.25, 0.5, 0.5, 0.75, 1, 1, 1 over 8 groups of 4
    accs = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 0], [1] * 4, [1] * 4, [1] * 4]
    hist = group_accuracy_histogram([_group(i, [float(a) for a in g]) for i, g in enumerate(accs)])
    assert hist == {"rollout/group_acc_hist/0": 1 / 8, "rollout/group_acc_hist/0-25": 1 / 8,
                    "rollout/group_acc_hist/25-50": 2 / 8, "rollout/group_acc_hist/50-75": 1 / 8,
                    "rollout/group_acc_hist/75-100": 0.0, "rollout/group_acc_hist/100": 3 / 8}
    assert group_accuracy_histogram([_group(0, [1.0, 1.0, 1.0, 0.0, 1.0])])["rollout/group_acc_hist/75-100"] == 1.0
    assert set(group_accuracy_histogram([]).values()) == {0.0}


def test_select_groups_drops_all_equal_groups_only():
    groups = [_group(0, [1, 1]), _group(1, [0, 1]), _group(2, [0, 0]), _group(3, [1, 0])]
    kept, dropped = select_groups(groups, dynamic=True)
    assert [g.group_id for g in kept] == [1, 3]
    assert dropped == {"all_correct": 1, "all_wrong": 1}
    assert select_groups(groups, dynamic=False)[0] == groups


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mgr")
    model = demo_task.write_demo_model_dir(tmp / "model")
    train, val = demo_task.write_demo_data(tmp / "data", task="single_digit")
    cfg = load_config("configs/test_tiny.yaml", [
        f"model.path={model}", f"data.train_path={train}", f"data.val_path={val}",
        "engine.num_engines=2", "rollout.prompts_per_step=6", "rollout.gen_batch_prompts=12",
        "rollout.max_response_tokens=48", "rollout.max_gen_batches=20",
        "reward.name=tests.rewards_for_tests:first_char_odd", f"run.run_dir={tmp}"])
    with local_ray(num_cpus=2):
        actor = ray.remote(RolloutManager).options(num_cpus=0, max_concurrency=4).remote(
            cfg.rollout, cfg.engine, cfg.reward, cfg.data, cfg.run.seed, str(model), str(tmp / "logs"))
        urls = [u for u, _ in ray.get(actor.engine_endpoints.remote())]
        ray.get(actor.mark_synced.remote(urls, 0))
        yield actor
        ray.get(actor.shutdown.remote())


def test_dynamic_sampling_keeps_mixed_groups_and_counts_drops(manager):
    probes_before = ray.get(manager.probes_sent.remote())
    batch = ray.get(manager.generate.remote(0))
    m = batch.metrics
    # Every group request in flight shares its engine's prober: at most one /health probe per
    # engine per engine.health_interval_s (2 s) of generation, however many requests wait.
    for url, sent in ray.get(manager.probes_sent.remote()).items():
        assert sent - probes_before.get(url, 0) <= m["rollout/generate_s"] / 2.0 + 1, (url, sent)
    assert len(batch.groups) == 6
    assert all(not g.accuracy_is_constant and len(g.samples) == 4 for g in batch.groups)
    # Independent recount: the reward is "first char odd", recomputed from the samples' text
    # would need the tokenizer; instead the counts must add up over the groups decided (in
    # order, up to the one that filled the batch; tests/rollout/test_streaming.py checks which).
    generated = m["rollout/groups_generated"]
    assert generated == len(batch.groups) + m["rollout/groups_dropped_all_correct"] + m["rollout/groups_dropped_all_wrong"]
    assert (m["rollout/gen_batches"] - 1) * 12 < generated <= m["rollout/gen_batches"] * 12


def test_memory_resumes_only_the_tags_each_engine_released(manager):
    # The CPU server refuses (400) a resume of a tag it did not release, where SGLang's
    # scheduler dies; a refusal would mark the engine dead, so the endpoints count checks it.
    urls = [u for u, _ in ray.get(manager.engine_endpoints.remote())]
    ray.get(manager.resume_memory.remote(["weights"]))  # nothing released: nothing sent
    ray.get(manager.release_memory.remote(["weights", "kv_cache"]))
    assert ray.get(manager.released_tags.remote()) == {u: ["kv_cache", "weights"] for u in urls}
    ray.get(manager.resume_memory.remote(["weights"]))
    ray.get(manager.resume_memory.remote(["weights", "kv_cache"]))  # only kv_cache is left to resume
    assert ray.get(manager.released_tags.remote()) == {u: [] for u in urls}
    assert [u for u, _ in ray.get(manager.engine_endpoints.remote())] == urls  # none was marked dead
    batch = ray.get(manager.generate.remote(0))  # serving again with its weights back
    assert len(batch.groups) == 6


def test_seeds_differ_per_sample_and_repeat_per_run():
    from rollout_sglang.manager import sample_seed

    seeds = {sample_seed(1, g, j) for g in range(50) for j in range(16)}
    assert len(seeds) == 50 * 16
    assert sample_seed(1, 3, 2) == sample_seed(1, 3, 2) != sample_seed(2, 3, 2)


@pytest.mark.faults
def test_killed_engine_mid_rollout_loses_no_group(manager):
    pids = ray.get(manager.engine_pids.remote())
    pending = manager.generate.remote(1)
    time.sleep(0.3)  # requests of 48 rows x up to 48 new tokens are in flight on both engines
    os.kill(pids[0], signal.SIGKILL)
    batches = [ray.get(pending)] + [ray.get(manager.generate.remote(1)) for _ in range(2)]
    ids = [g.group_id for b in batches for g in b.groups]
    assert len(ids) == len(set(ids)) == 18
    assert all(len(g.samples) == 4 for b in batches for g in b.groups)
    restarted = ray.get(manager.restart_dead_engines.remote())
    assert len(restarted) == 1
    assert ray.get(manager.engines_needing_sync.remote()) == restarted


def test_engines_ray_cannot_place_fail_at_the_deadline_naming_rays_reason(manager, tmp_path):
    """The module's Ray has no GPU: an SGLang engine on GPU asks for one and is never placed.
    The start fails at engine.schedule_timeout_s with Ray's view of it (it waited forever)."""
    from rollout_sglang.config import EngineConfig
    from rollout_sglang.engines.pool import EnginePool

    cfg = EngineConfig(backend="sglang", num_engines=2, engine_tp=4, schedule_timeout_s=2.0)
    pool = EnginePool()
    handles = pool._launch_engines(cfg, 0, str(tmp_path / "model"), str(tmp_path / "logs"), None, None, None)
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"engine 0 of 2 was not placed by Ray within "
                           r"engine.schedule_timeout_s=2 s: Ray has its actor PENDING_CREATION, asking for "
                           r"\{'GPU': 4\} on any node; the cluster has 0 GPUs in all, 0 free \(1 live nodes"):
            pool._await_engines(handles)
        assert time.monotonic() - t0 < 30
    finally:
        for h in handles:
            ray.kill(h)
