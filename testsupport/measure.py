"""Measurements shared by the tests and the benchmarks: the peak bytes torch's CPU allocator held.

What it does: `peak_allocated_bytes` runs a function under torch.profiler's memory events.
What it does not: time anything (benchmarks/common.py's `timed` does, for the benchmarks only).
"""

from __future__ import annotations


def peak_allocated_bytes(fn) -> int:
    """Run `fn()` once; the most bytes torch's CPU allocator held during it beyond what it held
    before (torch.profiler's memory events, every allocation and free in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
