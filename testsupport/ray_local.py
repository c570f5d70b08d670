"""A private local Ray for a test module, in a temp dir whose socket paths stay short.

What it does: `local_ray(num_cpus)` starts Ray in a fresh `/tmp/qae-ray-*` directory (Ray's
AF_UNIX socket paths must stay under 107 bytes, and pytest's own temp dirs under xdist,
`/tmp/pytest-of-<user>/pytest-N/popen-gw0/<test>/ray/session_<date>_<pid>/sockets/plasma_store`,
do not), with the repo on the workers' PYTHONPATH and one OpenMP thread per worker, and removes
the directory again at shutdown. What it does not: join an existing cluster (the library's
`megatron_qae.run.ray_cluster.connect` does that).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[str]:
    """Ray started for the `with` body and shut down after it; yields its temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="qae-ray-")
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}})
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
