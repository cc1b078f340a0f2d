"""This process's memory readings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workbench.sysmem import file_backed_bytes, process_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and RssFile are Linux's /proc fields")
def test_a_process_started_from_a_large_one_reads_its_own_peak():
    held = bytearray(600 * 2**20)  # noqa: F841 - this process's peak is now at least 600 MiB
    code = ("import resource; from workbench.sysmem import process_memory; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, process_memory()[1])")
    rusage_peak, own_peak = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout.split())
    assert rusage_peak > 600 * 2**20  # Linux carries ru_maxrss over the exec from the process that forked
    assert own_peak < 200 * 2**20  # an interpreter and psutil, not the parent's 600 MiB
    now, peak = process_memory()
    assert peak >= now > 600 * 2**20
    assert 0 < file_backed_bytes() < now  # the interpreter's and libraries' pages, at least


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is a Linux /proc field")
def test_another_process_is_read_by_its_pid():
    child = subprocess.Popen([sys.executable, "-c", "import sys; held = bytearray(300 * 2**20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        for _ in range(100):  # until the child holds its 300 MiB
            rss, peak = process_memory(child.pid)
            if rss > 300 * 2**20:
                break
            subprocess.run(["sleep", "0.05"])
        assert peak >= rss > 300 * 2**20
    finally:
        child.communicate(b"")
