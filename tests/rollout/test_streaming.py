"""Streaming generation (rollout_sglang/streaming.py): groups decided in submission order equal
the batch-at-a-time selection whatever order their requests complete in; the next batch is
drawn exactly when it is certainly needed; what is in flight when the batch is full is aborted
and waited for; the busy fraction is the union of request spans. Then the real thing: a
RolloutManager on a real CPU engine, dynamic sampling on, a batch that fills early -- the
server reports aborted requests and the trained groups equal an independent batch-at-a-time
computation against the same engine."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future

import pytest
import ray

from megatron_qae.config.loading import load_config
from rollout_sglang import demo_task
from rollout_sglang.sglang.client import GenerateOutput, SGLangClient
from rollout_sglang.data import PromptCursor, load_prompts
from rollout_sglang.manager import RolloutManager, sample_seed, select_groups
from rollout_sglang.streaming import busy_fraction, stream_groups
from rollout_sglang.types import Group, Prompt, Sample
from testsupport.ray_local import local_ray
from tests.rewards_for_tests import first_char_odd


def _scripted(accuracies: dict[int, list[float]], batch_size: int, max_batches: int, target: int,
              rng: random.Random):
    """stream_groups over fake requests that complete in random order; returns its result,
    the batches drawn (group ids) and the abort calls."""
    drawn: list[list[int]] = []
    futures: dict[int, Future] = {}
    aborts: list[float] = []

    def draw():
        if len(drawn) == max_batches:
            return None
        first = sum(len(b) for b in drawn)
        drawn.append(list(range(first, first + batch_size)))
        return [(g, Prompt(g, (1,), "1")) for g in drawn[-1]]

    def submit(batch):
        for gid, _ in batch:
            futures[gid] = Future()
        return [futures[gid] for gid, _ in batch]

    def score(answered):
        return [Group(gid, prompt, tuple(Sample(gid, (1,), (2,), (-1.0,), "stop", a, a, 0)
                                         for a in accuracies[gid])) for gid, prompt, _ in answered]

    def complete():  # answers the requests in random order, a few at a time
        while True:
            time.sleep(0.001)
            open_ = [g for g, f in list(futures.items()) if not f.done()]
            if aborts:
                for g in open_:
                    futures[g].set_result([GenerateOutput([5], [-1.0], "abort")])
            elif open_:
                futures[rng.choice(open_)].set_result([GenerateOutput([5], [-1.0], "stop")])
            if aborts and not open_:
                return

    worker = threading.Thread(target=complete, daemon=True)
    worker.start()
    res = stream_groups(draw, submit, score, lambda g: not g.accuracy_is_constant,
                        lambda gids: aborts.append(time.monotonic()), target)
    if not aborts:
        aborts.append(0.0)  # nothing was in flight: let the completer end
    worker.join(5)
    return res, drawn, aborts


@pytest.mark.parametrize("seed", range(20))
def test_streamed_selection_equals_batch_at_a_time(seed):
    rng = random.Random(seed)
    batch_size, max_batches, target = 5, 4, rng.choice([3, 6, 9])
    accuracies = {g: rng.choice([[1, 1], [0, 0], [0, 1], [1, 0]]) for g in range(batch_size * max_batches)}
    res, drawn, _ = _scripted(accuracies, batch_size, max_batches, target, rng)
    # Batch at a time (the code before streaming): draw, keep, until full; then kept[:target].
    kept, batches = [], 0
    while len(kept) < target and batches < max_batches:
        ids = range(batches * batch_size, (batches + 1) * batch_size)
        kept += [g for g in ids if accuracies[g][0] != accuracies[g][1]]
        batches += 1
    assert [g.group_id for g in res.kept] == kept[:target]
    assert len(drawn) == res.batches == batches  # the same batches, never one more
    # Decided: every group up to the one that filled the batch (all drawn ones when it never filled).
    last = kept[target - 1] if len(kept) >= target else batches * batch_size - 1
    assert [g.group_id for g in res.decided] == list(range(last + 1))


def test_next_batch_is_drawn_while_the_first_is_in_flight_exactly_when_needed():
    # Batches of 4, target 6: kept + undecided = 0 + 4 < 6 at once, so batch 2 goes out with
    # batch 1; then 0 + 8 >= 6, so batch 3 waits for decisions (two all-equal groups).
    accuracies = {g: [0, 1] for g in range(12)}
    accuracies[0] = accuracies[1] = [1, 1]
    res, drawn, aborts = _scripted(accuracies, 4, 3, 6, random.Random(0))
    assert [g.group_id for g in res.kept] == [2, 3, 4, 5, 6, 7]
    assert len(drawn) == 2 and res.batches == 2
    assert res.aborted_groups == 0 and aborts == [0.0]  # all of batch 2 was needed: nothing to abort


def test_busy_fraction_is_the_union_of_spans_per_engine():
    spans = [("a", 0.0, 2.0), ("a", 1.0, 3.0), ("a", 5.0, 6.0), ("b", 9.0, 20.0)]
    # a: [0, 3] and [5, 6] -> 4 of 10; b: [9, 10] -> 1 of 10 (clipped at the end)
    assert busy_fraction(spans, ["a", "b"], 0.0, 10.0) == pytest.approx((0.4 + 0.1) / 2)
    assert busy_fraction(spans, ["c"], 0.0, 10.0) == 0.0


@pytest.fixture(scope="module", params=[1, 5], ids=["group_per_request", "5_groups_per_request"])
def streaming_manager(tmp_path_factory, request):
    """A manager streaming one group per request, or 5 (rollout.groups_per_request: a request's
    groups are scored and decided in order when it answers); the kept groups must not change."""
    tmp = tmp_path_factory.mktemp("stream")
    model = demo_task.write_demo_model_dir(tmp / "model")
    train, _ = demo_task.write_demo_data(tmp / "data", task="single_digit")
    cfg = load_config("configs/test_tiny.yaml", [
        f"model.path={model}", f"data.train_path={train}", "data.val_path=null",
        "engine.num_engines=1", "rollout.prompts_per_step=2", "rollout.gen_batch_prompts=12",
        "rollout.max_response_tokens=48", "rollout.max_gen_batches=20",
        "reward.name=tests.rewards_for_tests:first_char_odd", f"run.run_dir={tmp}",
        f"rollout.groups_per_request={request.param}"])
    with local_ray(num_cpus=2):
        actor = ray.remote(RolloutManager).options(num_cpus=0, max_concurrency=4).remote(
            cfg.rollout, cfg.engine, cfg.reward, cfg.data, cfg.run.seed, str(model), str(tmp / "logs"))
        urls = [u for u, _ in ray.get(actor.engine_endpoints.remote())]
        ray.get(actor.mark_synced.remote(urls, 0))
        yield actor, cfg, urls[0], model, request.param
        ray.get(actor.shutdown.remote())


def _batch_at_a_time(cfg, url: str, model, steps: int) -> list[list[tuple]]:
    """The kept groups of `steps` steps computed as the code before streaming did: whole
    generation batches in one request, scored, selected, kept[:prompts_per_step]."""
    from transformers import AutoTokenizer

    r, d = cfg.rollout, cfg.data
    tok = AutoTokenizer.from_pretrained(model)
    prompts = load_prompts(d.train_path, tok, prompt_key=d.prompt_key, answer_key=d.answer_key,
                           apply_chat_template=d.apply_chat_template, max_prompt_tokens=r.max_prompt_tokens)
    cursor, gid, client, out = PromptCursor(len(prompts), d.seed, d.shuffle), 0, SGLangClient(url), []
    params = {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "max_new_tokens": r.max_response_tokens}
    n = r.n_samples_per_prompt
    for _ in range(steps):
        kept = []
        while len(kept) < r.prompts_per_step:
            batch = [prompts[i] for i in cursor.next_indices(r.gen_batch_prompts)]
            rows = [list(p.prompt_ids) for p in batch for _ in range(n)]
            per = [{**params, "sampling_seed": sample_seed(cfg.run.seed, gid + k, j)}
                   for k in range(len(batch)) for j in range(n)]
            outs = client.generate(rows, per)
            groups = []
            for k, p in enumerate(batch):
                samples = tuple(Sample(gid + k, p.prompt_ids, tuple(o.output_ids), tuple(o.output_logprobs),
                                       o.finish_reason, *(lambda res: (res.score, res.accuracy))(
                                           first_char_odd(tok.decode(o.output_ids, skip_special_tokens=True),
                                                          p.answer)), 0)
                                for o in outs[k * n:(k + 1) * n])
                groups.append(Group(gid + k, p, samples))
            gid += len(batch)
            kept += select_groups(groups, dynamic=True)[0]
        out.append([(g.group_id, g.prompt.index, [s.response_ids for s in g.samples])
                    for g in kept[:r.prompts_per_step]])
    return out


@pytest.mark.timeout(900)
def test_full_batch_aborts_the_rest_and_keeps_the_batch_at_a_time_groups(streaming_manager):
    actor, cfg, url, model, groups_per_request = streaming_manager
    client = SGLangClient(url)
    before = client.server_info()["aborted_requests"]
    batches = [ray.get(actor.generate.remote(0)) for _ in range(3)]
    aborted = client.server_info()["aborted_requests"] - before
    if groups_per_request == 1:  # with 5 per request, the last requests may answer with the first
        assert aborted > 0  # the server stopped requests that were decoding when the batch was full
        assert sum(b.metrics["rollout/groups_aborted"] for b in batches) > 0
    streamed = [[(g.group_id, g.prompt.index, [s.response_ids for s in g.samples]) for g in b.groups]
                for b in batches]
    assert streamed == _batch_at_a_time(cfg, url, model, 3)
    for b in batches:
        m = b.metrics
        assert m["rollout/groups"] == 2 and m["rollout/underfilled"] == 0.0
        assert 0.0 < m["rollout/engine_busy_frac"] <= 1.0
        assert 0.0 < m["rollout/time_to_full_batch_s"] <= m["rollout/generate_s"]
        assert m["rollout/gen_tokens_per_s"] > 0
        assert all(s.finish_reason != "abort" for g in b.groups for s in g.samples)


def test_a_request_of_several_groups_answers_each_group_its_own_outputs():
    from concurrent.futures import Future

    from rollout_sglang.manager import _slice

    request = Future()
    first, second = _slice(request, 0, 2), _slice(request, 2, 2)
    request.set_result(["a0", "a1", "b0", "b1"])
    assert first.result() == ["a0", "a1"] and second.result() == ["b0", "b1"]
    never_sent = Future()
    part = _slice(never_sent, 2, 2)
    never_sent.set_result([])  # a request cancelled before it was sent answers nothing
    assert part.result() == []
    failed = Future()
    part = _slice(failed, 0, 2)
    failed.set_exception(ValueError("engine gone"))
    assert isinstance(part.exception(), ValueError)
    cancelled = Future()
    part = _slice(cancelled, 0, 2)
    cancelled.cancel()
    assert part.cancelled()
