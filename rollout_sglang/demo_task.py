"""The CPU demo's tasks, with a tokenizer built in code and a tiny Qwen2-architecture config.

Two tasks:
- `padded_sums` (the demo): single-digit sums answered as a zero-padded two-digit number and the
  end token ("3+4=" -> "07<eos>", "9+8=" -> "17<eos>"; 100 problems, graded by the exact-match
  reward `exact_match`). Three answer tokens, so entropy and response length move during RL;
  a random policy is right about once in 16^3 samples, so the demo warms the policy up with a
  short supervised phase first (megatron_qae.run.sft_step).
- `single_digit` (the tests' quick task): "3+4=" answered by one digit (25 problems, sums up
  to 8, the `arithmetic` reward); a random policy is right about 1 time in 16, so RL has
  signal from the first step of a two-step test run.
What it does: writes a model directory (config.json + tokenizer files, no weights: the policy
starts from a seeded random init) and train / validation jsonl files in the verl schema. The
validation set holds the same problems as the training set (the demo shows the policy learning
the table; it is not a generalization benchmark). What it does not: train.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["<pad>", "<eos>"]
CHARS = list("0123456789+-=")
UNUSED = ["<unused0>"]


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast with a minimal chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS + UNUSED)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unused0>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unused0>",
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )


def write_demo_model_dir(path: str | Path, seed: int = 0) -> Path:
    """config.json (tiny Qwen2, GQA, qkv bias, untied) + tokenizer files; no weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
        "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "torch_dtype": "float32", "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "use_sliding_window": False,
        "attention_dropout": 0.0, "seed": seed,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


MAX_OPERAND = 4
"""single_digit: operands 0..MAX_OPERAND."""
TASKS = ("padded_sums", "single_digit")


def problems(task: str = "padded_sums") -> list[tuple[str, str]]:
    """(prompt, answer) of every problem of `task`: padded_sums, every a+b with 0 <= a, b <= 9
    answered with two digits; single_digit, every a+b with 0 <= a, b <= MAX_OPERAND."""
    if task == "padded_sums":
        return [(f"{a}+{b}=", f"{a + b:02d}") for a in range(10) for b in range(10)]
    if task == "single_digit":
        digits = range(MAX_OPERAND + 1)
        return [(f"{a}+{b}=", str(a + b)) for a in digits for b in digits]
    raise ValueError(f"demo task {task!r}: use one of {TASKS}")


def write_demo_data(directory: str | Path, seed: int = 0, task: str = "padded_sums") -> tuple[Path, Path]:
    """train.jsonl and val.jsonl of `task` in the verl schema; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"data_source": f"demo_{task}", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": a, "style": "rule"}} for q, a in problems(task)]
    paths = []
    for name in ("train", "val"):
        p = directory / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1]
