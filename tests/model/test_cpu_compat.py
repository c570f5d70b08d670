"""The CPU shim redirects CUDA device arguments on every thread that installs it: torch keeps
function-mode stacks per thread, and the training entry point imports megatron-core (whose
import installs the shim) on a thread while the main thread starts Ray and later builds the
model. Run in a fresh interpreter so no earlier install in this process hides the bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import threading
import torch
from megatron_qae.model import cpu_compat

other = threading.Thread(target=cpu_compat.install)
other.start(); other.join()
assert cpu_compat.is_installed()
assert cpu_compat.install()          # the main thread's own install
x = torch.zeros(3, device="cuda")    # megatron-core's buffers are made like this
y = torch.ones(2).cuda()
print("DEVICES", x.device, y.device)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim does nothing where CUDA is present")
def test_an_install_on_another_thread_does_not_leave_this_thread_without_the_redirect():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DEVICES cpu cpu" in out.stdout
