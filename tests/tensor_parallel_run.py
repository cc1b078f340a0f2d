"""Run by tests/test_distributed.py in its own process (vLLM's multiprocessing workers need a __main__ guard):
greedy tokens of a few prompts with tensor_parallel_size from argv, printed as JSON with vLLM's parallel config."""

import json
import sys

import workbench as wb

PROMPTS = ["The quick brown fox", "Paged attention splits", "Once upon a time"]

if __name__ == "__main__":
    size = int(sys.argv[1])
    options = {"tensor_parallel_size": size, "distributed_executor_backend": "mp"} if size > 1 else {}
    with wb.load("vllm", model="tiny-llama", max_model_len=512, **options) as engine:
        tokens = [r.token_ids for r in engine.generate(PROMPTS, max_tokens=8, temperature=0, chat=False)]
        parallel = engine.llm.llm_engine.vllm_config.parallel_config
        print(json.dumps({"tokens": tokens, "tensor_parallel_size": parallel.tensor_parallel_size,
                          "world_size": parallel.world_size}), flush=True)
