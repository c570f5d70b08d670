"""The CPU demo's task: single-digit sums ("3+4=") answered by one digit, with a tokenizer
built in code and a tiny Qwen2-architecture config.

What it does: writes a model directory (config.json + tokenizer files, no weights: the policy
starts from a seeded random init, so a random policy answers right about 1 time in 16 and RL
has signal from the first step) and train / validation jsonl files in the verl schema. The
validation set holds the same 25 problems (the demo shows the policy learning the table; it is
not a generalization benchmark). What it does not: train.
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


def problems() -> list[tuple[str, str]]:
    """(prompt, answer) of every a+b with 0 <= a, b <= MAX_OPERAND (25 problems)."""
    digits = range(MAX_OPERAND + 1)
    return [(f"{a}+{b}=", str(a + b)) for a in digits for b in digits]


def write_demo_data(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl in the verl schema; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"data_source": "demo_digits", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": a, "style": "rule"}} for q, a in problems()]
    paths = []
    for name in ("train", "val"):
        p = directory / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1]
