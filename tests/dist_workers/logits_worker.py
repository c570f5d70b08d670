"""torchrun worker: Megatron logits of a tiny model loaded from transformers weights.

Builds the megatron GPTModel for the given tensor-parallel degree from the HF config, loads the
transformers model's weights through the one mapping, runs one forward over a fixed token
sequence, gathers the vocab-parallel logits and (rank 0) saves them with transformers' own.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.model import parallel, weights  # noqa: E402
from megatron_qae.config.sections import ParallelConfig  # noqa: E402
from megatron_qae.model import qwen2_mapping as qm  # noqa: E402
from megatron_qae.model.build import build_model_chunks, build_transformer_config  # noqa: E402
from testsupport import tiny  # noqa: E402
from testsupport.jobs import run_jobs  # noqa: E402


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--family", choices=["qwen2", "qwen3"], required=True)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    groups = parallel.init_distributed(ParallelConfig(tp=a.tp))
    make = tiny.tiny_qwen3_config if a.family == "qwen3" else tiny.tiny_hf_config
    hf = make(tied=a.tied)
    reference = tiny.tiny_hf_model(hf)
    config = build_transformer_config(hf, groups.dims)
    chunks = build_model_chunks(hf, config, transformer_impl="local")
    state = reference.state_dict()
    weights.load_full_weights(chunks, lambda name: qm.hf_to_megatron(name, state, hf), groups.tp_rank, a.tp)
    tokens = torch.tensor([[3, 17, 5, 42, 8, 1, 60, 9, 33, 2, 11, 7]])
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        local = chunks[0].eval()(tokens, positions, None)  # the spec's causal mask type
        shards = [torch.empty_like(local) for _ in range(a.tp)]
        dist.all_gather(shards, local.contiguous(), group=groups.tp)
        ours = torch.cat(shards, dim=-1)
        theirs = reference(tokens).logits
    names = sorted(n for n, _ in weights.global_named_parameters(chunks[0]))
    if dist.get_rank() == 0:
        torch.save({"ours": ours, "theirs": theirs, "names": names}, a.out)


if __name__ == "__main__":
    run_jobs(main)
