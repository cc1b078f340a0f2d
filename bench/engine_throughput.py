"""Throughput of each engine through the workbench beside the same engine called directly, in one run.

One workload: 32 chat prompts x 64 new tokens, greedy, the bundled SmolLM2-135M in float32. Each engine is loaded
once; the workbench call and the direct call use the same loaded model and alternate (neither always first). The
table gives the best of the repeats and the median ratio of each repeat's two adjacent runs (these machines are
noisy: read the median ratio, not the absolute numbers).

    .venv/bin/python bench/engine_throughput.py [--engines vllm transformers ...] [--repeats 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import workbench as wb  # noqa: E402

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "music", "bees", "glass", "trains", "tea",
          "maps", "clocks", "snow", "paper", "bridges", "salt", "whales", "copper", "kites", "deserts",
          "coffee", "lighthouses", "owls", "gold", "forests", "ice", "cotton", "stars", "wind", "cheese",
          "ships", "caves"]
PROMPTS = [f"Write a short paragraph about {topic}." for topic in TOPICS]
MAX_TOKENS = 64


def direct_transformers(engine: wb.Engine, prompt_ids: list[list[int]]) -> int:
    """HF `generate` on one left-padded batch, as a user would call it."""
    import torch
    from transformers import GenerationConfig

    tok = engine.tokenizer
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompt_ids}, return_tensors="pt").to(engine.device)
    config = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=engine.eos_ids)
    with torch.inference_mode():
        out = engine.hf_model.generate(**batch, generation_config=config)
    new = out[:, batch["input_ids"].shape[1]:]
    # Count what a user gets: tokens up to and including each row's end-of-sequence.
    return sum(_until_eos(row.tolist(), engine.eos_ids) for row in new)


def _until_eos(tokens: list[int], eos: list[int]) -> int:
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
    return len(tokens)


def direct_transformers_paged(engine: wb.Engine, prompt_ids: list[list[int]]) -> int:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=engine.eos_ids,
                              pad_token_id=engine.pad_id)
    out = engine.hf_model.generate_batch(inputs=prompt_ids, generation_config=config,
                                         continuous_batching_config=engine._cb_config(None), warmup=False)
    return sum(len(o.generated_tokens) for o in out.values())


def direct_vllm(engine: wb.Engine, prompt_ids: list[list[int]]) -> int:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs)


# DeepSpeed's direct call is its module's `generate`: the engine's `hf_model` is the module DeepSpeed wraps.
DIRECT = {"transformers": direct_transformers, "transformers-paged": direct_transformers_paged,
          "vllm": direct_vllm, "deepspeed": direct_transformers}


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    installed = [s.name for s in wb.engines() if s.installed and s.name in DIRECT]  # in-process, with a baseline
    parser.add_argument("--engines", nargs="+", default=installed, choices=sorted(DIRECT))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", help="cpu or cuda, for the Hugging Face engines (default: theirs)")
    args = parser.parse_args()
    options = {"device": args.device} if args.device else {}

    rows = []
    for name in args.engines:
        engine = wb.load(name, model=args.model, isolate=False, **options)  # the direct calls need its internals
        prompt_ids = [engine._encode(p, chat=True) for p in PROMPTS]
        engine.generate(PROMPTS[:2], max_tokens=4, temperature=0)  # warm up both paths' first-call costs
        best = {"workbench": 0.0, "direct": 0.0}
        ratios = []  # workbench / direct, from the two runs of one repeat: robust to the machine's slow drifts
        calls = {
            "workbench": lambda engine=engine: sum(
                len(r.token_ids) for r in engine.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0)),
            "direct": lambda engine=engine, name=name, prompt_ids=prompt_ids: DIRECT[name](engine, prompt_ids),
        }
        for repeat in range(args.repeats):
            this = {}
            for mode in (("workbench", "direct") if repeat % 2 == 0 else ("direct", "workbench")):
                seconds, tokens = timed(calls[mode])
                this[mode] = tokens / seconds
                best[mode] = max(best[mode], this[mode])
            ratios.append(this["workbench"] / this["direct"])
        engine.close()
        rows.append((name, best["workbench"], best["direct"], statistics.median(ratios)))
        print(f"{name}: workbench {best['workbench']:.1f} tok/s, direct {best['direct']:.1f} tok/s", flush=True)

    print(f"\n{len(PROMPTS)} chat prompts x {MAX_TOKENS} new tokens, greedy, {args.model}, float32, "
          f"{args.device or 'default device'}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"best of {args.repeats}\n")
    print("| engine | workbench tokens/s (best) | direct tokens/s (best) | ratio of bests | median ratio per repeat |")
    print("| --- | --- | --- | --- | --- |")
    for name, ours, direct, median in rows:
        print(f"| {name} | {ours:.1f} | {direct:.1f} | {ours / direct:.3f} | {median:.3f} |")


if __name__ == "__main__":
    main()
