"""DP-aware QAE: 2 gloo ranks, random uneven splits, bit-identical to one process."""

from testsupport import tiny


def test_distributed_advantages_equal_single_process_exactly():
    proc = tiny.torchrun(tiny.ROOT / "tests" / "dist_workers" / "advantage_worker.py", 2, [], timeout_s=120)
    assert "rank 0: 80 splits equal" in proc.stdout and "rank 1: 80 splits equal" in proc.stdout
