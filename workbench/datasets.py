"""Recorded workloads: ShareGPT conversations and Mooncake request traces, read as vLLM's `bench serve` reads them.

>>> from workbench.datasets import load_requests
>>> requests = load_requests("sharegpt.json", tokenizer="smollm2-135m", n=64)      # doctest: +SKIP
>>> requests = load_requests("mooncake_trace.jsonl", tokenizer="smollm2-135m")     # doctest: +SKIP

- ShareGPT (a JSON list of `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`):
  the first turn is the prompt, and the reply's length in tokens is the request's output length; conversations
  shorter than 4 tokens either way, or longer than 1024 prompt tokens or 2048 in all, are skipped, as vLLM does.
- Mooncake (JSON lines of `{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}`): each hash
  id stands for one block of `block_tokens` prompt tokens, the same block wherever the id appears, so requests that
  share leading hash ids share that many blocks of prompt and meet a prefix cache as in the recorded service. The
  prompt's tokens are drawn from the model's vocabulary (special tokens left out), seeded by the hash id, and sent as
  token ids; requests arrive at their timestamps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from workbench.errors import InvalidRequestError
from workbench.workload import Request

SHAREGPT_FIELDS = ("conversations",)
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def load_requests(path: str | Path, tokenizer: Any = "smollm2-135m", n: int | None = None,
                  **options: Any) -> list[Request]:
    """Read a dataset file in either format (told apart by its content) into requests.

    `tokenizer` is a model alias or folder, or a tokenizer; `options` go to `load_sharegpt` or `load_mooncake`.
    """
    path = Path(path)
    first = _first_entry(path)
    if isinstance(first, dict) and "conversations" in first:
        return load_sharegpt(path, tokenizer, n, **options)
    if isinstance(first, dict) and any(name in first for name in MOONCAKE_FIELDS):
        return load_mooncake(path, tokenizer, n, **options)
    found = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise InvalidRequestError(f"{path.name} is neither a ShareGPT file (entries need {', '.join(SHAREGPT_FIELDS)}) "
                              f"nor a Mooncake trace (lines need {', '.join(MOONCAKE_FIELDS)}); its first entry has "
                              f"{found}.")


def load_sharegpt(path: str | Path, tokenizer: Any = "smollm2-135m", n: int | None = None,
                  output_tokens: int | None = None, shuffle: bool = True, seed: int = 0,
                  ignore_eos: bool = True) -> list[Request]:
    """ShareGPT conversations as chat requests, all arriving at once (give the load to `engine.run` or `sweep`).

    `output_tokens` fixes every output length instead of the replies'; `ignore_eos=True` makes each request produce
    exactly its output length, so runs compare. Entries are shuffled with `seed`, as vLLM does, unless `shuffle=False`.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise InvalidRequestError(f"{path.name} is not ShareGPT: it should hold a JSON list of conversations.")
    for k, entry in enumerate(data):
        missing = [name for name in SHAREGPT_FIELDS if not isinstance(entry, dict) or name not in entry]
        if missing:
            raise InvalidRequestError(f"{path.name} is not ShareGPT: entry {k} has no {', '.join(missing)} (a list of "
                                      f"{{'from', 'value'}} turns).")
    entries = [e for e in data if len(e["conversations"]) >= 2]
    if shuffle:
        random.Random(seed).shuffle(entries)
    tok = _tokenizer(tokenizer)
    requests = []
    for entry in entries:
        if n is not None and len(requests) >= n:
            break
        try:
            prompt, reply = (str(turn["value"]) for turn in entry["conversations"][:2])
        except (KeyError, TypeError):
            raise InvalidRequestError(f"{path.name}: a conversation turn has no 'value'.") from None
        prompt_len = len(tok(prompt).input_ids)
        output_len = output_tokens or len(tok(reply).input_ids)
        if prompt_len < 4 or (output_tokens is None and output_len < 4) or prompt_len > 1024 \
                or prompt_len + output_len > 2048:
            continue  # vLLM's is_valid_sequence
        requests.append(Request(prompt, max_tokens=output_len, ignore_eos=ignore_eos))
    if not requests:
        raise InvalidRequestError(f"{path.name} has no conversation vLLM's filters keep (4 to 1024 prompt tokens, "
                                  f"at least 4 reply tokens, 2048 in all).")
    return requests


def load_mooncake(path: str | Path, tokenizer: Any = "smollm2-135m", n: int | None = None, block_tokens: int = 512,
                  seconds_per_unit: float = 0.001, ignore_eos: bool = True) -> list[Request]:
    """A Mooncake request trace as token-id requests arriving at their timestamps (milliseconds in Mooncake's
    traces: `seconds_per_unit=0.001`), the first at 0.

    `block_tokens` is the prompt tokens one hash id stands for (512 in Mooncake's published traces; use the size
    the trace was recorded with).
    """
    path = Path(path)
    tok = _tokenizer(tokenizer)
    special = set(tok.all_special_ids)
    vocab = sorted(v for v in tok.get_vocab().values() if v not in special)
    blocks: dict[tuple[int, int], list[int]] = {}
    requests, previous = [], None
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if n is not None and len(requests) >= n:
            break
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidRequestError(f"{path.name} line {line_no} is not JSON: a Mooncake trace has one JSON object "
                                      f"per line.") from None
        missing = [name for name in MOONCAKE_FIELDS if not isinstance(entry, dict) or name not in entry]
        if missing:
            raise InvalidRequestError(f"{path.name} line {line_no} is not a Mooncake request: it has no "
                                      f"{', '.join(missing)}.")
        stamp = float(entry["timestamp"]) * seconds_per_unit
        if previous is not None and stamp < previous:
            raise InvalidRequestError(f"{path.name} line {line_no}: its timestamp {entry['timestamp']} is earlier "
                                      f"than the line before's; a trace's requests must be in order of arrival.")
        previous = stamp
        length = int(entry["input_length"])
        prompt: list[int] = []
        for hash_id in entry["hash_ids"]:
            size = min(block_tokens, length - len(prompt))
            if size <= 0:
                break
            key = (int(hash_id), size)
            if key not in blocks:
                blocks[key] = random.Random(key[0] * 1_000_003 + key[1]).choices(vocab, k=size)
            prompt.extend(blocks[key])
        if len(prompt) < length:  # a trace whose hash ids cover less than its input: the rest is its own
            prompt.extend(random.Random(line_no).choices(vocab, k=length - len(prompt)))
        requests.append((stamp, Request(tuple(prompt), max_tokens=int(entry["output_length"]), chat=False,
                                        ignore_eos=ignore_eos)))
    if not requests:
        raise InvalidRequestError(f"{path.name} holds no requests.")
    start = requests[0][0]
    return [Request(r.prompt, r.max_tokens, arrival_s=round(t - start, 6), chat=False, ignore_eos=r.ignore_eos)
            for t, r in requests]


def _first_entry(path: Path) -> Any:
    """The first entry of a JSON list, or the first line of a JSON-lines file."""
    if not path.is_file():
        raise InvalidRequestError(f"no dataset file at {path}.")
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        data = _read_json(path)
        return data[0] if data else {}
    line = text.splitlines()[0] if text else ""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise InvalidRequestError(f"{path.name} is neither JSON nor JSON lines: a dataset is a ShareGPT JSON file or "
                                  f"a Mooncake JSONL trace.") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"{path.name} cannot be read as JSON: {exc}") from None


def _tokenizer(tokenizer: Any):
    """A tokenizer from a model alias or folder, or the tokenizer given."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    from workbench.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(str(tokenizer)).path)
