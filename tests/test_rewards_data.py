"""Rewards (math-verify, overlong penalty, user functions) and prompt data (parquet / jsonl)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout_sglang import demo_task
from rollout_sglang.data import PromptCursor, load_prompts
from rollout_sglang.rewards import RewardResult, apply_overlong_penalty, dapo_math, load_reward_fn, score_batch


def test_dapo_math_reward_uses_math_verify_equivalence():
    assert dapo_math("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == RewardResult(1.0, 1.0)
    assert dapo_math("Answer: 12", "12").accuracy == 1.0
    assert dapo_math("Answer: 13", "12") == RewardResult(-1.0, 0.0)


@pytest.mark.parametrize("length,expected", [(16384, 1.0), (16384 + 1024, 0.75), (20480, 0.0)])
def test_overlong_penalty_is_linear_in_the_buffer(length, expected):
    # DAPO: expected = 20480 - 4096; penalty = min(-(len - expected) / 4096, 0)
    assert apply_overlong_penalty(1.0, length, 20480, 4096, 1.0) == pytest.approx(expected)


def test_score_batch_in_processes_equals_main_thread_and_rejects_nan():
    texts, answers = ["Answer: 3", "Answer: 4", "7"], ["3", "3", "7"]
    assert score_batch(dapo_math, texts, answers, num_workers=2) == score_batch(dapo_math, texts, answers)
    with pytest.raises(ValueError, match="score=nan for response 0"):
        score_batch(lambda t, a: RewardResult(float("nan"), 0.0), ["x"], ["y"])


def test_load_reward_fn_resolves_user_functions_and_explains_failures():
    assert load_reward_fn("tests.rewards_for_tests:first_char_odd")("3", "").accuracy == 1.0
    with pytest.raises(ValueError, match="cannot import"):
        load_reward_fn("no.such.module:fn")
    with pytest.raises(ValueError, match="use 'dapo_math'"):
        load_reward_fn("nonsense")


def test_parquet_in_verl_schema_and_jsonl_give_the_same_prompts(tmp_path):
    tok = demo_task.build_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "reward_model": {"ground_truth": str(i + 1)}}
            for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_prompts(tmp_path / "d.parquet", tok), load_prompts(tmp_path / "d.jsonl", tok)
    assert a == b and a[2].prompt_ids == tuple(tok("2+1=")["input_ids"]) and a[2].answer == "3"
    with pytest.raises(KeyError, match="available"):
        load_prompts(tmp_path / "d.jsonl", tok, answer_key="reward_model.answer")
    with pytest.raises(ValueError, match="longer than rollout.max_prompt_tokens=2"):
        load_prompts(tmp_path / "d.jsonl", tok, max_prompt_tokens=2)


def test_cursor_is_a_seeded_permutation_per_epoch_and_resumes_exactly():
    c = PromptCursor(10, seed=3)
    first = c.next_indices(10)
    assert sorted(first) == list(range(10))
    c.next_indices(4)
    state = c.state_dict()
    rest = c.next_indices(9)
    d = PromptCursor(10, seed=3)
    d.load_state_dict(state)
    assert d.next_indices(9) == rest
    with pytest.raises(ValueError, match="same data.train_path"):
        PromptCursor(11, seed=3).load_state_dict(state)
