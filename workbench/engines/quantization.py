"""Weights quantized as they load, by the field's libraries through transformers' `quantization_config`, and the
bytes a quantized weight really stores (its packed data and scales, not its logical size)."""

from __future__ import annotations

from importlib.util import find_spec

from workbench.errors import UnsupportedOptionError

#: the `quantization` option's values: what each one is, and the library that does it
QUANTIZATIONS = {
    "int8": ("torchao", "torchao's int8 weight-only (Int8WeightOnlyConfig): an int8 per weight, a scale per row"),
    "nf4": ("bitsandbytes", "bitsandbytes' 4-bit NormalFloat (QLoRA's NF4): blocks of 64 weights, their scales "
                            "quantized again (double quantization)"),
}


def check_quantization(name: str | None) -> None:
    """Refuse, before any loading, a `quantization` that is not known or whose library is not installed."""
    if name is None:
        return
    if name not in QUANTIZATIONS:
        known = ", ".join(f"{k!r} ({library})" for k, (library, _) in QUANTIZATIONS.items())
        raise UnsupportedOptionError(f"quantization {name!r} is not known: use one of {known}.")
    library = QUANTIZATIONS[name][0]
    if find_spec(library) is None:
        raise UnsupportedOptionError(f"quantization {name!r} needs {library}: pip install 'workbench[quantization]'.")


def quantization_config(name: str, compute_dtype):
    """The transformers `quantization_config` for `name`; `compute_dtype`: what the matmuls run in."""
    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def weight_storage(weight) -> tuple[int, int, bool]:
    """(parameters, bytes stored, quantized) of one weight tensor. A quantized weight counts its packed data and
    every scale its format keeps beside it: what it takes in memory, not what its logical dtype would."""
    state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit: two weights a byte, the scales in its state
    if state is not None:
        import torch

        kept = state.as_dict(packed=True).values()  # what bitsandbytes saves of it: absmax, nested absmax, maps
        return state.shape.numel(), weight.nbytes + sum(t.nbytes for t in kept if isinstance(t, torch.Tensor)), True
    names = getattr(weight, "tensor_data_names", None)  # torchao's quantized tensor subclasses
    if names:
        parts = [getattr(weight, n, None) for n in (*names, *getattr(weight, "optional_tensor_data_names", ()))]
        return weight.numel(), sum(p.nbytes for p in parts if p is not None), True
    return weight.numel(), weight.numel() * weight.element_size(), False
