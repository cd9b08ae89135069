"""wattlog's own child processes: niced, left out of the process-scope estimates, accounted when reaped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from wattlog import helper_processes
from wattlog.helper_processes import HelperProcess
from wattlog.sources.estimate import EstimatedCpu, EstimatedRam

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
posix_only = pytest.mark.skipif(not hasattr(os, "waitid"), reason="reads the zombie with os.waitid (POSIX)")


def _burner(cls, cpu_s: float, **kw) -> subprocess.Popen:
    return cls([sys.executable, "-c", BURN.format(s=cpu_s)], **kw)


def _tree_cpu_s(src: EstimatedCpu) -> float:
    return src._cpu_seconds()[0]


def test_a_helper_leaves_the_live_set_when_reaped():
    proc = HelperProcess([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        assert proc.pid in helper_processes.live_pids()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)  # still sleeping: a timeout, as Popen.wait gives
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in helper_processes.live_pids()


@posix_only
@pytest.mark.parametrize("reap", ["wait", "poll", "communicate", "kill"])
def test_a_reaped_helper_adds_its_cpu_seconds(reap):
    before = helper_processes.reaped_cpu_s()
    proc = _burner(HelperProcess, 5.0 if reap == "kill" else 0.4, stdout=subprocess.PIPE)
    if reap == "kill":
        import psutil

        deadline = time.monotonic() + 30
        while sum(psutil.Process(proc.pid).cpu_times()[:2]) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.02)  # niced: on a busy machine it may get the CPU late
        proc.kill()
        proc.wait()
    elif reap == "poll":
        while proc.poll() is None:
            time.sleep(0.01)
    elif reap == "communicate":
        proc.communicate(timeout=30)
    else:
        proc.wait(timeout=30)
    added = helper_processes.reaped_cpu_s() - before
    assert added >= 0.3  # its CPU time (0.4 s burnt; the kernel counts in clock ticks)
    assert added < 6.0


@posix_only
def test_the_process_scope_cpu_estimate_leaves_helpers_out_and_counts_other_children():
    src = EstimatedCpu(tdp_w=100.0, scope="process", update_interval_s=0.0)
    src.start()
    try:
        t0 = _tree_cpu_s(src)
        other = _burner(subprocess.Popen, 0.4)
        other.wait(timeout=30)
        t1 = _tree_cpu_s(src)
        assert t1 - t0 >= 0.35  # a user's child (0.4 s burnt): billed, once reaped

        helper = _burner(HelperProcess, 0.4)
        seen = [_tree_cpu_s(src)]
        while helper.poll() is None:  # read it live, as the sampler does, until it is reaped
            seen.append(_tree_cpu_s(src))
            time.sleep(0.02)
        seen.append(_tree_cpu_s(src))
        assert max(seen) - t1 < 0.15  # this test's own polling only, not the helper's 0.4 s
        assert seen == sorted(seen)  # never a dip at the reap
    finally:
        src.close()


def test_the_process_scope_ram_estimate_leaves_helpers_out():
    src = EstimatedRam(scope="process", update_interval_s=0.0)
    src.start()
    code = "import time; b = bytearray(200 * 2**20); time.sleep(3)"
    try:
        alone = src._used_bytes()
        helper = HelperProcess([sys.executable, "-c", code])
        other = subprocess.Popen([sys.executable, "-c", code])
        try:
            time.sleep(1.0)
            with_both = src._used_bytes()
            assert with_both - alone > 150 * 2**20  # the user's child's 200 MiB
            assert with_both - alone < 350 * 2**20  # not the helper's as well
        finally:
            for p in (helper, other):
                p.kill()
                p.wait()
    finally:
        src.close()


def test_only_process_scope_estimates_do_not_see_helpers(tmp_path):
    from wattlog.sources.nvml import NvmlGpu
    from wattlog.sources.rapl import Rapl

    assert not EstimatedCpu(scope="process").sees_helper_processes
    assert not EstimatedRam(scope="process").sees_helper_processes
    assert EstimatedCpu(scope="system").sees_helper_processes
    assert EstimatedRam(scope="system").sees_helper_processes
    assert Rapl(root=tmp_path).sees_helper_processes
    assert not NvmlGpu.sees_helper_processes

