"""Memory readings of this process: its resident memory, and torch's allocations on a GPU."""

from __future__ import annotations


def process_memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process."""
    import resource

    import psutil

    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, and updated lazily
    return rss, max(rss, peak)


def device_memory(device: str) -> tuple[int, int]:
    """(bytes allocated now, peak bytes allocated) by this process's torch on a CUDA `device`; (0, 0) elsewhere.

    On a GPU the weights and the KV cache live in device memory, which the process's resident size does not show.
    """
    if not device.startswith("cuda"):
        return 0, 0
    import torch

    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
