"""Rewards (overlong penalty, loading by name) and prompt data (parquet / jsonl, verl's schema)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout_sglang.config import DataConfig
from rollout_sglang import demo_task
from rollout_sglang.data import PromptCursor, load_prompts
from rollout_sglang.rewards.dapo import dapo_math
from rollout_sglang.rewards.registry import apply_overlong_penalty, arithmetic, exact_match, load_reward_fn


@pytest.mark.parametrize("length,expected", [(16384, 1.0), (16384 + 1024, 0.75), (20480, 0.0)])
def test_overlong_penalty_is_linear_in_the_buffer(length, expected):
    # DAPO: expected = 20480 - 4096; penalty = min(-(len - expected) / 4096, 0)
    assert apply_overlong_penalty(1.0, length, 20480, 4096, 1.0) == pytest.approx(expected)


def test_load_reward_fn_resolves_builtins_and_user_functions_and_explains_failures():
    assert load_reward_fn("tests.rewards_for_tests:first_char_odd")("3", "").accuracy == 1.0
    assert load_reward_fn("dapo_math") is dapo_math
    with pytest.raises(ValueError, match="module 'no.such.module' does not import"):
        load_reward_fn("no.such.module:fn")
    with pytest.raises(ValueError, match="use one of"):
        load_reward_fn("nonsense")


def test_demo_reward_is_an_integer_comparison_without_math_verify():
    assert [arithmetic(t, "7").score for t in ("7", " 7", "07", "8", "", "-", "7+0", "²")] == [1, 1, 1, -1, -1, -1, -1, -1]
    assert arithmetic("-3", "-3").accuracy == 1.0


def test_demo_reward_is_an_exact_match_of_the_padded_answer():
    texts = ("07", " 07 ", "7", "007", "17", "", "07+0")
    assert [exact_match(t, "07").score for t in texts] == [1, 1, -1, -1, -1, -1, -1]
    assert exact_match("07", "07").pred == "07" and exact_match("12", "07").accuracy == 0.0


def test_demo_task_padded_sums_and_single_digit_problems():
    padded = demo_task.problems()
    assert len(padded) == 100 and ("3+4=", "07") in padded and ("9+8=", "17") in padded
    assert all(len(a) == 2 and int(a) == int(q[0]) + int(q[2]) for q, a in padded)
    assert len(demo_task.problems("single_digit")) == 25 and ("3+4=", "7") in demo_task.problems("single_digit")
    with pytest.raises(ValueError, match="use one of"):
        demo_task.problems("nope")


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


def test_demo_reward_does_not_import_math_verify():
    import subprocess
    import sys

    code = ("import sys; from rollout_sglang.rewards.registry import load_reward_fn; load_reward_fn('arithmetic'); "
            "load_reward_fn('exact_match'); "
            "sys.exit('math_verify' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=demo_task.__file__.rsplit("/", 2)[0]).returncode == 0


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokenizer():
    """A byte-level tokenizer (every byte one token) with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    return hf


def _dapo_prompt(problem: str) -> str:
    return ("Solve the following math problem step by step. The last line of your response should be of the "
            "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
            f"{problem}\n\nRemember to put your answer on its own line after \"Answer:\".")


def _verl_rows(problems: list[tuple[str, str]], source: str, repeats: int) -> list[dict]:
    """Rows as verl's DAPO-Math-17k / AIME-2024 parquet publish them (repeats included)."""
    return [{"data_source": source, "prompt": [{"content": _dapo_prompt(q), "role": "user"}], "ability": "MATH",
             "reward_model": {"ground_truth": a, "style": "rule"},
             "extra_info": {"index": f"{source}-{k}-{r}", "split": "train"}}
            for r in range(repeats) for k, (q, a) in enumerate(problems)]


def test_dapo_math_and_aime_parquet_in_verls_schema_load_through_the_trainer_path(tmp_path, caplog):
    tok = _byte_tokenizer()
    train = [("In triangle $ABC$, $AB = 13$ and $BC = 14$. Find $\\lfloor x \\rfloor$.", "34"),
             ("Let $f(x) = x^2$. Compute $f(3)$.", "9"), ("How many primes are below 10?", "4")]
    aime = [("Find the number of ordered pairs $(m,n)$ such that $m^2n = 20^{20}$.", "231"),
            ("Every morning Aya goes for a $9$-kilometer-long walk.", "204")]
    pq.write_table(pa.Table.from_pylist(_verl_rows(train, "math_dapo", repeats=4)), tmp_path / "dapo-math-17k.parquet")
    pq.write_table(pa.Table.from_pylist(_verl_rows(aime, "aime-2024", repeats=3)), tmp_path / "aime-2024.parquet")
    d = DataConfig()  # the trainer's defaults name verl's columns
    kw = dict(prompt_key=d.prompt_key, answer_key=d.answer_key, apply_chat_template=d.apply_chat_template)
    with caplog.at_level(logging.INFO, logger="rollout_sglang.data"):
        prompts = load_prompts(tmp_path / "dapo-math-17k.parquet", tok, max_prompt_tokens=2048, **kw)
        evals = load_prompts(tmp_path / "aime-2024.parquet", tok, **kw)
    assert "12 rows, 3 distinct prompts, data_source {'math_dapo': 12}" in caplog.text
    assert [p.index for p in prompts] == list(range(12)) and len(evals) == 6  # repeats kept, as published
    for p, (q, a) in zip(prompts, train * 4):
        # Independent rendering of the chat template, decoded back from the token ids.
        expected = f"<|im_start|>user\n{_dapo_prompt(q)}<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(list(p.prompt_ids)) == expected
        assert p.answer == a and p.text == _dapo_prompt(q)
    assert prompts[0].prompt_ids is prompts[3].prompt_ids  # a repeated prompt is tokenized once
    assert [e.answer for e in evals] == ["231", "204"] * 3
    # The loaded ground truth is what the reward compares with.
    assert dapo_math("... so m^2 n works out.\nAnswer: 231", evals[0].answer).score == 1.0


def test_a_prompt_cell_that_is_not_chat_messages_is_refused_naming_the_row(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "text": "2+2="}], "reward_model": {"ground_truth": "4"}}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"d.jsonl row 1: the prompt is list .* expected a list of chat messages"):
        load_prompts(tmp_path / "d.jsonl", demo_task.build_tokenizer())
    with pytest.raises(KeyError, match=r"no column \['question'\]"):
        pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d.parquet")
        load_prompts(tmp_path / "d.parquet", demo_task.build_tokenizer(), prompt_key="question")
