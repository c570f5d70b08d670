"""Who digests which checkpoint file: every file exactly once over the ranks, each rank the
data files it wrote itself (pure function, no process group)."""

from __future__ import annotations

from megatron_qae.persistence.checkpoint_verify import _share


def test_each_rank_digests_its_own_data_files_and_every_file_once():
    world = 4
    names = sorted([".metadata", "metadata.json", "common.pt", "sub/extra.bin"]
                   + [f"__{r}_{i}.distcp" for r in range(world) for i in range(3)]
                   + ["__7_0.distcp"])  # a writer outside this world (saved by a larger one)
    shares = [_share(names, rank, world) for rank in range(world)]
    assert sorted(n for share in shares for n in share) == names
    for rank, share in enumerate(shares):
        assert {f"__{rank}_{i}.distcp" for i in range(3)} <= set(share)
        assert not [n for n in share if n.startswith("__") and n.split("_")[2] not in (str(rank), "7")]
