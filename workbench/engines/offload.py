"""Weights offloaded by accelerate's big-model inference, as Transformers loads them with `device_map` and
`max_memory`: the layers that fit the budget stay on the engine's device, the rest wait in CPU memory or on disk
(`offload_folder`) and are paged in for each forward pass, one layer at a time.

`Offload` builds `from_pretrained`'s arguments from the engine's options and then measures, during every offloaded
module's forward pass (with its weights paged in), how many bytes of weights are resident: the figure the budget
is about, read from the model's own tensors rather than from the configuration.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from typing import Any

from workbench.errors import UnsupportedOptionError
from workbench.types import OffloadFacts


class Offload:
    """One model's offload: its loading arguments, and the weights it holds resident, measured."""

    def __init__(self, options: dict[str, Any], device: str) -> None:
        self.device = device
        self.budget_bytes: int | None = None
        self.kwargs: dict[str, Any] = {}
        self._folder: str | None = None
        self._made_folder = False
        self._lock = threading.Lock()
        self.resident_peak_bytes = 0
        self._model = None
        budget, device_map = options.get("max_memory"), options.get("device_map")
        if budget is None and device_map is None:
            return
        if budget is not None:
            self.kwargs["max_memory"] = self._max_memory(budget)
        self.kwargs["device_map"] = device_map or "auto"
        self._folder = options.get("offload_folder")
        if self._folder is None:  # pages of weights that fit nowhere else: a folder of ours, removed at close
            self._folder = tempfile.mkdtemp(prefix="workbench-offload-")
            self._made_folder = True
        self.kwargs["offload_folder"] = self._folder

    def _max_memory(self, budget: Any) -> dict:
        """accelerate's `max_memory` from a budget: a dict as accelerate takes it, or one size for the engine's
        device (bytes, or "200MiB", "2GB" ...), everything else going to CPU memory on a GPU and to disk on a CPU."""
        from accelerate.utils import convert_file_size_to_int

        if isinstance(budget, dict):
            return budget
        try:
            self.budget_bytes = convert_file_size_to_int(budget)
        except (ValueError, TypeError):
            raise UnsupportedOptionError(
                f"max_memory={budget!r} is not a size: give bytes, a size such as '200MiB' or '2GB', or accelerate's "
                f"dict of device -> size.") from None
        if self.budget_bytes <= 0:
            raise UnsupportedOptionError(f"max_memory={budget!r} must be more than 0 bytes.")
        key = 0 if self.device.startswith("cuda") else "cpu"
        return {key: self.budget_bytes}

    def attach(self, model) -> None:
        """Measure resident weights during each offloaded module's forward pass, after accelerate paged them in."""
        from accelerate.hooks import ModelHook, SequentialHook

        self._model = model
        at_rest = sum(p.nbytes for p in model.parameters() if p.device.type != "meta")  # offloaded ones: meta
        self._paged_in: dict[int, int] = {}  # offloaded module -> bytes of its weights in memory when last seen
        self._resident = at_rest  # what stays and every offloaded module's paged-in bytes, kept as a sum
        self.resident_peak_bytes = at_rest
        offload = self

        class Meter(ModelHook):  # runs after accelerate's hook: its weights are in on the way in, out on the way out
            def pre_forward(self, module, *args, **kwargs):
                offload._see(module)
                return args, kwargs

            def post_forward(self, module, output):
                offload._see(module)
                return output

        for module in model.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and getattr(hook, "offload", False):
                # replaced, not re-added: accelerate's hook reads `_hf_hook` on every call, and re-adding it would
                # run its set-up (which moves the weights to the meta device) a second time
                module._hf_hook = SequentialHook(hook, Meter())

    def _see(self, module) -> None:
        # This module's own tensors only, read afresh (accelerate pages a layer in by putting new tensors in it): a
        # walk of the whole model at every offloaded module costs 40% of the decoding speed.
        held = sum(p.nbytes for p in module.parameters() if p.device.type != "meta")
        with self._lock:
            self._resident += held - self._paged_in.get(id(module), 0)
            self._paged_in[id(module)] = held
            self.resident_peak_bytes = max(self.resident_peak_bytes, self._resident)

    def facts(self) -> OffloadFacts:
        """Where the weights are placed and the most of them resident at once, since loading."""
        model = self._model
        placement: dict[str, int] = {}
        for device in (getattr(model, "hf_device_map", None) or {"": self.device}).values():
            name = f"cuda:{device}" if isinstance(device, int) else str(device)
            placement[name] = placement.get(name, 0) + 1
        params = list(model.parameters())
        offloaded = sum(p.nbytes for p in params if p.device.type == "meta")
        total = sum(p.nbytes for p in params)
        with self._lock:
            peak = self.resident_peak_bytes
        return OffloadFacts(self.budget_bytes, placement, total, offloaded, peak)

    def release(self) -> None:
        """Remove the offload folder if it was made for this model."""
        self._model = None
        if self._made_folder and self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
