"""torch.compile on a transformers model, and what the compilers say they did: torch's own counters (dynamo's
graphs and breaks, inductor's kernels and fusion) and vLLM's compilation counter."""

from __future__ import annotations

from workbench.errors import UnsupportedOptionError
from workbench.types import CompileFacts

#: the transformers engine's `compile` option: what torch.compile is applied to
COMPILE_SCOPES = {
    "layers": "each decoder layer (PyTorch's regional compilation: one layer's graph serves them all)",
    "model": "the whole forward pass, one graph (longer to compile)",
}
#: options that change the forward pass in ways not compiled and checked here
_NOT_WITH_COMPILE = ("max_memory", "device_map", "offload_folder", "quantization", "prompt_lookup_num_tokens")


def check_compile(options: dict) -> str | None:
    """The `compile` scope asked for, or a short error for one not known or not combined here."""
    scope = options.get("compile")
    if scope is None:
        return None
    if scope not in COMPILE_SCOPES:
        raise UnsupportedOptionError(f"compile {scope!r} is not known: use 'layers' or 'model'.")
    clash = [name for name in _NOT_WITH_COMPILE if options.get(name) is not None]
    if clash:
        raise UnsupportedOptionError(f"compile cannot be combined with {', '.join(clash)} here: load with one "
                                     f"or the other.")
    return scope


def compile_model(model, scope: str) -> None:
    """Apply torch.compile with dynamic shapes, so that a new prompt length or batch size reuses the graphs."""
    import torch

    if scope == "model":
        model.forward = torch.compile(model.forward, dynamic=True)
        return
    for layer in model.model.layers:
        layer.compile(dynamic=True)


def inductor_counts() -> tuple[int, int, int]:
    """(kernels generated, IR nodes before fusion, FX graphs loaded from its cache): inductor's own counts in this
    process so far (an engine's worker runs one engine)."""
    import torch._inductor.metrics as inductor
    from torch._dynamo.utils import counters

    return inductor.generated_kernel_count, inductor.ir_nodes_pre_fusion, counters["inductor"]["fxgraph_cache_hit"]


def torch_facts(mode: str) -> CompileFacts:
    """What torch.compile did in this process: dynamo's graphs, breaks and compile time, inductor's kernels."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    kernels, nodes, hits = inductor_counts()
    timed = compilation_time_metrics.get("_compile.compile_inner")  # not kept by an ahead-of-time compile
    return CompileFacts(mode, sum(timed) if timed else None,
                        counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), kernels, nodes,
                        hits, "torch._dynamo.utils counters and compilation_time_metrics, torch._inductor.metrics")
