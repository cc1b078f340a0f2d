"""Run by tests/test_distributed.py in its own process(es): greedy tokens of a few prompts with the engine and
tensor parallel size from argv, printed as JSON with what the engine says about its ranks.

vLLM starts its own workers (they need a __main__ guard); DeepSpeed needs one process per rank, started by torchrun.
"""

import json
import os
import sys

import workbench as wb

PROMPTS = ["The quick brown fox", "Paged attention splits", "Once upon a time"]


def _layout(engine) -> dict:
    if engine.name == "vllm":
        parallel = engine.llm.llm_engine.vllm_config.parallel_config
        return {"tensor_parallel_size": parallel.tensor_parallel_size, "world_size": parallel.world_size}
    import torch
    import torch.distributed as dist

    ids = engine.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():  # the sharded layers' partial sums meet in an all-reduce: the logits must agree too
        logits = engine.hf_model(ids).logits[0, -1, :16].tolist()
    q_proj = engine.hf_model.model.layers[0].self_attn.q_proj.weight  # AutoTP splits its rows across ranks
    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "q_proj_rows": q_proj.shape[0], "logits": logits, "tensor_parallel": engine.info.options["tensor_parallel"]}


if __name__ == "__main__":
    engine_name, size = sys.argv[1], int(sys.argv[2])
    options = {"tensor_parallel_size": size} if size > 1 else {}
    if engine_name == "vllm":
        options.update({"max_model_len": 512, **({"distributed_executor_backend": "mp"} if size > 1 else {})})
    with wb.load(engine_name, model="tiny-llama", isolate=False, **options) as engine:  # its internals are read
        tokens = [r.token_ids for r in engine.generate(PROMPTS, max_tokens=8, temperature=0, chat=False)]
        line = json.dumps({"tokens": tokens, **_layout(engine)}) + "\n"
        sys.stdout.flush()
        os.write(1, line.encode())  # one write, under the pipe's atomic size: ranks' lines never interleave
