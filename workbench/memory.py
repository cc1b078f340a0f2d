"""Where an engine's memory goes: weights, KV cache and the rest, and how many requests fit in a budget.

The KV figure from a model's config is `2 (K and V) x layers x KV heads x head dim x bytes per element` per token;
`measure_memory` loads an engine in a fresh Python process (so nothing else the kernel holds is counted) and
measures what it really allocates.

>>> from workbench.memory import kv_bytes_per_token, measure_memory, requests_that_fit
>>> kv_bytes_per_token("smollm2-135m", "float32")                     # doctest: +SKIP
46080
>>> measure_memory("vllm", dtype="float32")["kv_cache_bytes"]          # doctest: +SKIP
1073479680
>>> requests_that_fit(4 * 2**30, weights_bytes=538_060_032, bytes_per_token=46080, tokens_per_request=1000,
...                   block_size=32)
79
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from workbench.kv_sizes import bytes_per_element, kv_bytes_per_token, kv_shape, requests_that_fit

__all__ = ["bytes_per_element", "kv_bytes_per_token", "kv_shape", "measure_memory", "requests_that_fit"]


def measure_memory(engine: str, model: str | None = None, dtype: str = "float32", prompt: str = "Tell me a story.",
                   max_tokens: int = 32, timeout_s: float = 600, **options: Any) -> dict[str, Any]:
    """Load `engine` in a fresh Python process, generate once, and report where its memory went.

    Keys: baseline_bytes (the process with the engine's libraries imported), weights_bytes, kv_cache_bytes (paged
    engines: the block pool; `transformers`: the cache this request built), rest_bytes (the peak less all three:
    activations, buffers, allocator slack), peak_bytes, kv_bytes_per_token (config) and
    kv_bytes_per_token_measured, load_s, answer, decode_tokens_per_s, device, file_backed_bytes (of the resident
    memory after the run, pages of files the kernel can drop: a memory-mapped checkpoint, libraries); for an
    engine that offloads (`max_memory=...`): budget_bytes, placement, offloaded_bytes, weights_resident_peak_bytes
    (measured during the forward passes). On a GPU the weights and KV cache are device memory:
    gpu_loaded_bytes (torch's allocations once loaded), gpu_peak_bytes, and rest_bytes is the GPU peak less weights
    and KV cache. On failure, `error` holds the engine's own short message.
    """
    from workbench.models import DEFAULT_MODEL

    spec = {"engine": engine, "model": model or DEFAULT_MODEL, "dtype": dtype, "prompt": prompt,
            "max_tokens": max_tokens, "options": options}
    env = dict(os.environ, TQDM_DISABLE="1")
    try:
        done = subprocess.run([sys.executable, "-m", "workbench.memory", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "dtype": dtype, "error": f"no answer within {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"engine": engine, "dtype": dtype, "error": f"the measuring process failed: {tail}"}
    return json.loads(lines[-1])


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process: imports, baseline, load, generate, and the figures `measure_memory` returns."""
    import importlib

    from workbench.engines import SPECS, load
    from workbench.errors import WorkbenchError
    from workbench.sysmem import device_memory, file_backed_bytes, process_memory

    row: dict[str, Any] = {"engine": spec["engine"], "dtype": spec["dtype"]}
    try:
        for module in SPECS[spec["engine"]].requires if spec["engine"] in SPECS else ():
            importlib.import_module(module)  # the libraries count in the baseline, not in the engine's share
        baseline, _ = process_memory()
        # in this process: it is the one measured (a worker of its own would hold the engine's memory instead)
        with load(spec["engine"], model=spec["model"], dtype=spec["dtype"], isolate=False,
                  **spec["options"]) as engine:
            loaded, _ = process_memory()
            info, facts = engine.info, engine.cache_facts
            gpu_loaded = device_memory(info.device)[0]
            kv = engine.measure_kv_cache()
            result = engine.generate(spec["prompt"], max_tokens=spec["max_tokens"], temperature=0)[0]
            _, peak = process_memory()
            tokens = result.metrics.prompt_tokens + result.metrics.generated_tokens
            decode = result.metrics.token_latencies_s[1:]  # the gaps after the first token
            kv_bytes = kv.bytes if facts.paged else round(kv.bytes_per_token * tokens)
            row.update(
                baseline_bytes=baseline, loaded_bytes=loaded, peak_bytes=peak, weights_bytes=info.weight_bytes,
                kv_cache_bytes=kv_bytes, rest_bytes=peak - baseline - info.weight_bytes - kv_bytes,
                kv_bytes_per_token=engine.kv_bytes_per_token, kv_bytes_per_token_measured=kv.bytes_per_token,
                kv_source=kv.source, kv_token_slots=kv.token_slots if facts.paged else tokens,
                paged=facts.paged, block_size=facts.block_size, max_model_len=facts.max_model_len,
                load_s=engine.load_seconds, answer=result.text, device=info.device,
                file_backed_bytes=file_backed_bytes(),
                decode_tokens_per_s=len(decode) / sum(decode) if decode else None)
            try:
                offload = engine.offload()
            except WorkbenchError:  # an engine that does not offload
                offload = None
            if offload is not None:
                row.update(budget_bytes=offload.budget_bytes, placement=offload.placement,
                           offloaded_bytes=offload.offloaded_bytes,
                           weights_resident_peak_bytes=offload.resident_peak_bytes)
            gpu_peak = device_memory(info.device)[1]
            if gpu_peak:  # on a GPU, in this process: weights and KV cache are GPU memory, not the process's
                row.update(gpu_loaded_bytes=gpu_loaded, gpu_peak_bytes=gpu_peak,
                           rest_bytes=gpu_peak - info.weight_bytes - kv_bytes)
    except WorkbenchError as exc:
        row["error"] = str(exc)
    return row


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))), flush=True)
