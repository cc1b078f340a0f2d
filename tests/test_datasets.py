"""Recorded workloads read as vLLM's bench reads them: ShareGPT conversations and Mooncake request traces (small
files the tests write; nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import workbench as wb
from workbench.analysis import engine_state
from workbench.datasets import load_mooncake, load_requests, load_sharegpt
from workbench.models import resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)


def conversation(prompt: str, reply: str) -> dict:
    return {"id": "x", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}


def test_sharegpt_first_turn_is_the_prompt_and_the_reply_sets_the_output_length(tmp_path, tokenizer):
    path = tmp_path / "sharegpt.json"
    reply = "Paris is the capital of France, and it is known for the Eiffel Tower and its museums."
    path.write_text(json.dumps([
        conversation("What is the capital of France? Answer in one sentence.", reply),
        conversation("Hi", "Hello there, how can I help you today?"),  # a prompt under 4 tokens: skipped
        {"id": "y", "conversations": [{"from": "human", "value": "A question left without an answer."}]},
        conversation("Name three colours of the rainbow, please.", "Red, orange and yellow."),
    ]))
    requests = load_sharegpt(path, tokenizer, shuffle=False)
    assert [r.prompt[:9] for r in requests] == ["What is t", "Name thre"]
    assert requests[0].max_tokens == len(tokenizer(reply).input_ids) and requests[0].ignore_eos
    assert requests[0].chat and requests[0].arrival_s == 0
    assert len(load_sharegpt(path, tokenizer, n=1)) == 1
    assert [r.max_tokens for r in load_requests(path, tokenizer, output_tokens=7)] == [7, 7]


def mooncake_file(tmp_path, lines) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_mooncake_requests_sharing_hash_ids_share_their_prompts_first_blocks(tmp_path, tokenizer):
    path = mooncake_file(tmp_path, [
        {"timestamp": 1000, "input_length": 150, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"timestamp": 1250, "input_length": 140, "output_length": 6, "hash_ids": [7, 8, 11]},
        {"timestamp": 2000, "input_length": 60, "output_length": 3, "hash_ids": [12]},
    ])
    first, second, third = load_requests(path, tokenizer, block_tokens=64)
    assert [r.arrival_s for r in (first, second, third)] == [0.0, 0.25, 1.0]  # ms, from the first request
    assert [len(r.prompt) for r in (first, second, third)] == [150, 140, 60]
    assert first.prompt[:128] == second.prompt[:128] and first.prompt[128:140] != second.prompt[128:140]
    assert third.prompt[:60] != first.prompt[:60]
    assert not set(first.prompt) & set(tokenizer.all_special_ids)
    assert [r.max_tokens for r in (first, second, third)] == [5, 6, 3] and not first.chat


@pytest.mark.parametrize("content, message", [
    ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]}\n', "has no output_length"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
     '{"timestamp": 1, "input_length": 10, "output_length": 2, "hash_ids": [2]}\n', "earlier than the line before"),
    ('[{"id": 1, "turns": []}]', "neither a ShareGPT file.*its first entry has \\['id', 'turns'\\]"),
    ('{"prompt": "hi"}\n', "neither a ShareGPT file.*nor a Mooncake trace"),
    ('not json at all', "neither JSON nor JSON lines"),
])
def test_a_file_in_neither_format_says_what_is_missing(tmp_path, tokenizer, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(wb.InvalidRequestError, match=message) as error:
        load_requests(path, tokenizer)
    assert "\n" not in str(error.value)


def test_a_mooncake_trace_meets_vllms_prefix_cache(load_shared, tmp_path):
    engine = load_shared("vllm")
    block = engine.cache_facts.block_size
    path = mooncake_file(tmp_path, [
        {"timestamp": 0, "input_length": 2 * block + 20, "output_length": 4, "hash_ids": [1, 2, 3]},
        {"timestamp": 600, "input_length": 2 * block + 30, "output_length": 4, "hash_ids": [1, 2, 4]},
    ])
    trace = engine.run(load_mooncake(path, engine.tokenizer, block_tokens=block))
    assert [r.metrics.prompt_tokens for r in trace.results] == [2 * block + 20, 2 * block + 30]
    assert trace.requests_df()["cached_tokens"].tolist() == [0, 2 * block]  # the two shared blocks, from the cache
    assert trace.engine_counters["vllm:prefix_cache_hits"] == 2 * block
    assert engine_state(trace)["prefix_cache_hit_rate"] > 0
