"""What the two Hugging Face Transformers adapters share: loading, dtypes, generation configs, engine facts."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from workbench.engines.quantization import weight_storage
from workbench.errors import UnsupportedOptionError
from workbench.types import EngineInfo, SamplingOptions, TokenScores

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """The torch dtype for a dtype name, or a short error listing the accepted names."""
    import torch

    if name not in DTYPES:
        raise UnsupportedOptionError(f"dtype {name!r} is not known: use one of float32, float16, bfloat16.")
    return getattr(torch, DTYPES[name])


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_causal_lm(path, dtype: str, device: str, **kwargs: Any):
    """The model in eval mode on `device`; with a `device_map` in `kwargs`, placed by accelerate instead."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
    return (model if "device_map" in kwargs else model.to(device)).eval()


def score_tokens(model, ids: list[int]) -> TokenScores:
    """One forward pass over `ids`: the log-probability of each next token and the model's first choice there."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        following = torch.tensor(ids[1:], device=logits.device)[:, None]
        return TokenScores(tuple(ids), tuple(logprobs.gather(1, following)[:, 0].tolist()),
                           tuple(logits.argmax(-1).tolist()))


def generation_config(options: SamplingOptions, eos_ids: list[int], pad_id: int, max_new_tokens: int):
    """A GenerationConfig that says exactly what `options` say (the model's own defaults do not leak in)."""
    from transformers import GenerationConfig

    sample = not options.greedy
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=options.temperature if sample else None,
        top_p=options.top_p if sample else None,
        top_k=options.top_k if sample else None,
        eos_token_id=None if options.ignore_eos else eos_ids,
        pad_token_id=pad_id,
        stop_strings=list(options.stop) or None,
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def hf_info(engine_name: str, model, resolved, dtype: str, device: str, max_model_len: int,
            options: dict) -> EngineInfo:
    weights = [weight_storage(p) for p in {id(p): p for p in model.parameters()}.values()]  # tied ones once
    quantized = [(n, size) for n, size, held_quantized in weights if held_quantized]
    return EngineInfo(
        engine=engine_name,
        engine_version=f"transformers {version('transformers')}",
        device=device,
        dtype=DTYPES[dtype],
        model=resolved.name,
        model_path=str(resolved.path),
        parameters=sum(n for n, _, _ in weights),
        weight_bytes=sum(size for _, size, _ in weights),
        max_model_len=max_model_len,
        options=dict(options),
        quantization=options.get("quantization"),
        quantized_parameters=sum(n for n, _ in quantized),
        quantized_bytes=sum(size for _, size in quantized),
    )
