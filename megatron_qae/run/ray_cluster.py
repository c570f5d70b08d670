"""Ray for one run: join the cluster `ray.address` names, or start a private local one.

What it does: connects this process to Ray once (later calls do nothing), with Ray's own
logging routed through ours. Light on purpose (imports only Ray), so that the training entry
point can start Ray while megatron-core is still importing. What it does not: create actors
(rollout.py does) or choose the Ray auth mode (train.py does).
"""

from __future__ import annotations

import tempfile

import ray


def connect(address: str | None, num_cpus: int) -> None:
    """Join the cluster at `address` (`ray.address`), or start a local Ray with `num_cpus`
    CPUs (`ray.num_cpus`)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # A short private temp dir: Ray's socket paths must stay under 107 bytes.
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False,  # its records go through ours (console.py)
                 _temp_dir=tempfile.mkdtemp(prefix="qae-ray-"))
