"""KV-cache sizes from a model's config: `2 (K and V) x layers x KV heads x head dim x bytes per element` per token,
and how many requests fit in a budget. A leaf: engines and `workbench.memory` both use it.

>>> requests_that_fit(4 * 2**30, weights_bytes=538_060_032, bytes_per_token=46080, tokens_per_request=1000,
...                   block_size=32)
79
"""

from __future__ import annotations

from math import ceil

_HALF = ("float16", "fp16", "bfloat16", "bf16")


def bytes_per_element(dtype: str) -> int:
    """Bytes one weight or cache element takes in `dtype` (2 for float16/bfloat16, 4 for float32).

    >>> bytes_per_element("bfloat16")
    2
    """
    return 2 if dtype in _HALF else 4


def kv_shape(config, dtype: str) -> tuple[int, int, int, int]:
    """(layers, KV heads, head dim, bytes per element) of a model config in `dtype`."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim, bytes_per_element(dtype)


def kv_bytes_per_token(model, dtype: str = "float32") -> int:
    """Bytes one token's keys and values take over all layers, from the model's config (a model alias, a folder,
    or a config object)."""
    if isinstance(model, str):
        from transformers import AutoConfig

        from workbench.models import resolve_model

        model = AutoConfig.from_pretrained(resolve_model(model).path)
    layers, kv_heads, head_dim, itemsize = kv_shape(model, dtype)
    return 2 * layers * kv_heads * head_dim * itemsize


def requests_that_fit(budget_bytes: int, weights_bytes: int, bytes_per_token: int, tokens_per_request: int,
                      block_size: int = 1, reserve_tokens: int | None = None) -> int:
    """How many requests of `tokens_per_request` (prompt + output) hold their KV cache at once in `budget_bytes`,
    once the weights are in.

    A paged cache gives each request whole blocks of `block_size` tokens; a contiguous one reserves
    `reserve_tokens` per request up front (the model's context, for systems that reserve the maximum).
    """
    per_request = reserve_tokens if reserve_tokens is not None else ceil(tokens_per_request / block_size) * block_size
    room = budget_bytes - weights_bytes
    return max(0, room // (per_request * bytes_per_token))
