"""Memory readings of this process (or another of this machine's, by pid): its resident memory, and torch's
allocations on a GPU."""

from __future__ import annotations


def process_memory(pid: int | None = None) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process, or of process `pid` (an engine's rank worker).

    >>> rss, peak = process_memory()
    >>> 0 < rss <= peak
    True
    """
    import psutil

    rss = psutil.Process(pid).memory_info().rss
    return rss, max(rss, _peak_resident_bytes(pid))


def _peak_resident_bytes(pid: int | None = None) -> int:
    # The high-water mark of the process's own memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    # an exec from the process that forked, so a worker or a measuring process started from a 2 GiB kernel would
    # read a 2 GiB peak of its own.
    status = _proc_status("VmHWM", pid)
    if status is not None or pid is not None:
        return status or 0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _proc_status(field: str, pid: int | None = None) -> int | None:
    """A size in bytes from /proc/<pid>/status (VmHWM, RssFile ...; this process's by default), or None where
    there is none."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def file_backed_bytes() -> int:
    """Bytes of this process's resident memory that are pages of files (a memory-mapped checkpoint, libraries):
    the kernel can drop them and read them again, unlike the rest. 0 where /proc does not say (not Linux)."""
    return _proc_status("RssFile") or 0


def device_memory(device: str) -> tuple[int, int]:
    """(bytes allocated now, peak bytes allocated) by this process's torch on a CUDA `device`; (0, 0) elsewhere.

    On a GPU the weights and the KV cache live in device memory, which the process's resident size does not show.
    """
    if not device.startswith("cuda"):
        return 0, 0
    import torch

    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
