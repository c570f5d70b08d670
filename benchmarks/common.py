"""Shared set-up of the benchmarks: a single-process megatron world and a mid-size CPU model."""

from __future__ import annotations

import torch


def single_process_world() -> None:
    """Environment of a one-rank torchrun, so the benchmarks run as plain scripts."""
    from megatron_qae.launch_env import single_process_env

    single_process_env()


def bench_hf_config(hidden: int = 256, layers: int = 4, vocab: int = 2048) -> dict:
    """A Qwen2-architecture config big enough that compute, not overhead, dominates on CPU."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 2), "num_key_value_heads": max(hidden // 128, 1),
        "intermediate_size": hidden * 4, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "hidden_act": "silu", "initializer_range": 0.02,
    }


def timed(fn, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of fn() in seconds (after one warm-up call)."""
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
