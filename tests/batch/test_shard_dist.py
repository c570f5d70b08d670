"""Each DP rank's advantages from its own TrainShard (2 and 3 gloo ranks, skipping on and off)
are bit-identical to the single-process advantages of the whole batch."""

import pytest

from testsupport import tiny


@pytest.mark.parametrize("ranks", [2, 3])
def test_shard_advantages_equal_single_process_on_every_dp_rank(ranks):
    proc = tiny.torchrun(tiny.ROOT / "tests" / "dist_workers" / "shard_advantage_worker.py", ranks, [], timeout_s=300)
    for rank in range(ranks):
        assert f"rank {rank}: 36 shards equal" in proc.stdout, proc.stdout[-2000:]
