"""train.reuse_freed_memory: a CPU step's freed blocks stay in the process instead of being faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pairtune.train.memory import reuse_freed_memory

# A step's pattern: about 150 MB of activations alive at once, all freed at the end, again and again.
PROBE = textwrap.dedent(
    """
    import ctypes, resource
    import torch
    from pairtune.train.memory import reuse_freed_memory

    def step():
        held = [torch.zeros(mb * 262144) for mb in (6, 8, 7, 5) * 6]
        del held

    def faults_per_step():
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

    # glibc's starting thresholds, held fixed (left alone, glibc moves them with the history of frees)
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 128 * 1024)
    libc.mallopt(-1, 128 * 1024)
    default = faults_per_step()
    applied = reuse_freed_memory()
    print(default, applied, faults_per_step())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds are Linux-only")
def test_steps_stop_faulting_pages_in_once_freed_memory_is_kept():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, applied, kept = float(out[0]), out[1] == "True", float(out[2])
    assert applied
    assert default > 10_000  # glibc's starting thresholds give the step's memory back and fault it in again
    assert kept < default / 50  # kept: the same blocks are reused (a few pages move with Python objects)


def test_it_reports_whether_it_applied():
    assert reuse_freed_memory() is sys.platform.startswith("linux")
