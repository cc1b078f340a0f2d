"""DeepSpeed ZeRO-Inference on this machine: the bundled model under ZeRO stage 3 with its parameters offloaded to
CPU memory and to NVMe (a folder), beside accelerate's disk offload and the plain `transformers` engine, each
engine in a worker of its own.

    .venv/bin/python bench/zero_inference.py            # prints a table: ran or the refusal, tokens, bytes, time

ZeRO-3 keeps each parameter's partition where `offload_param` says and gathers a module's parameters for its
forward pass only; "weights resident at most" is measured during the passes (`engine.offload()`).
"""

from __future__ import annotations

import time

import workbench as wb

PROMPT = "What is the capital of France?"
TOKENS = 16
RUNS = (("transformers", {}), ("transformers", {"max_memory": "150MiB"}), ("deepspeed", {"offload_param": "cpu"}),
        ("deepspeed", {"offload_param": "nvme"}))


def main() -> None:
    rows, reference = [], None
    for engine_name, options in RUNS:
        label = f"{engine_name} {options or ''}".strip()
        try:
            start = time.perf_counter()
            with wb.load(engine_name, **options) as engine:
                load_s = time.perf_counter() - start
                result = engine.generate(PROMPT, max_tokens=TOKENS, temperature=0)[0]
                facts = engine.offload()
        except wb.WorkbenchError as exc:
            rows.append(f"| {label} | {exc} | | | | |")
            continue
        reference = reference or result.token_ids
        decode = result.metrics.token_latencies_s[1:]
        rows.append(f"| {label} | {result.text!r} | {result.token_ids == reference} | "
                    f"{facts.resident_peak_bytes / 2**20:.1f} of {facts.weight_bytes / 2**20:.1f} | "
                    f"{len(decode) / sum(decode):.2f} | {load_s:.1f} |")
    print("| engine, options | answer (or refusal) | tokens as the first row's | weights resident at most MiB | "
          "decode tokens/s | load s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
