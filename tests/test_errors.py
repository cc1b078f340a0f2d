"""Bad input gets a short, clear error, and the engine stays usable afterwards."""

from __future__ import annotations

import importlib.util

import pytest

import workbench as wb
from conftest import HAVE_VLLM


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(wb.UnknownEngineError, match="known engines are transformers, transformers-paged, vllm"):
        wb.load("vlm")


def test_engine_not_installed_names_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(wb.EngineNotInstalledError, match=r"pip install 'workbench\[vllm\]'"):
        wb.load("vllm")
    status = {s.name: s for s in wb.engines()}["vllm"]
    assert not status.installed and "vllm" in status.reason and "workbench[vllm]" in status.install


def test_engines_lists_every_engine_with_its_state():
    statuses = {s.name: s for s in wb.engines()}
    assert set(statuses) == {"transformers", "transformers-paged", "vllm", "deepspeed", "tensorrt-llm",
                             "openai", "tgi"}
    assert statuses["transformers"].installed and statuses["transformers"].reason == ""
    assert statuses["vllm"].installed == HAVE_VLLM
    assert {name for name, s in statuses.items() if s.remote} == {"openai", "tgi"}  # servers, reached over HTTP


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(wb.UnsupportedOptionError, match="no option blok_size; it accepts dtype, max_model_len"):
        wb.load("transformers", model="tiny-llama", blok_size=16)


@pytest.mark.parametrize("options, message", [
    ({"prompt_lookup_num_tokens": 4, "max_batch_size": 2}, "one sequence at a time: drop max_batch_size"),
    ({"prompt_lookup_num_tokens": 0.5}, "prompt_lookup_num_tokens must be a whole number"),
    ({"max_matching_ngram_size": 2}, "max_matching_ngram_size needs prompt_lookup_num_tokens"),
])
def test_prompt_lookup_options_that_cannot_run_say_why(options, message):
    with pytest.raises(wb.UnsupportedOptionError, match=message):
        wb.load("transformers", model="tiny-llama", **options)


@pytest.mark.parametrize("options, message", [
    ({"quantization": "int3"}, "quantization 'int3' is not known: use one of 'int8' \\(torchao\\), 'nf4'"),
    ({"quantization": "nf4", "max_memory": "200MiB"}, "quantization cannot be combined with max_memory"),
])
def test_a_quantization_that_cannot_run_says_why(options, message):
    with pytest.raises(wb.UnsupportedOptionError, match=message):
        wb.load("transformers", model="tiny-llama", **options)


@pytest.mark.parametrize("name", ["transformers", pytest.param("vllm", marks=pytest.mark.skipif(
    not HAVE_VLLM, reason="vllm is not installed"))])
def test_scoring_a_text_too_short_says_so_and_the_engine_still_scores(load_shared, name):
    engine = load_shared(name)
    too_short = r"score\(\) needs 2 to \d+ tokens \(the context\); this text has 1\."
    with pytest.raises(wb.InvalidRequestError, match=too_short):
        engine.score("Hi")
    assert engine.score("Hello there, my friend.").perplexity > 1


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
def test_bfloat16_on_this_cpu_asks_for_float32():
    from workbench.engines.vllm import cpu_supports

    if cpu_supports("bfloat16"):
        pytest.skip("this CPU runs bfloat16 in vLLM")
    with pytest.raises(wb.UnsupportedOptionError, match="dtype='float32'"):
        wb.load("vllm", model="tiny-llama", dtype="bfloat16")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be an integer of at least 1"),
        (dict(max_tokens=2.5), "max_tokens must be an integer"),
        (dict(temperature=-0.5), "temperature must be a number >= 0"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(stop=[""]), "each stop string must be a non-empty string"),
        (dict(stop=""), "each stop string must be a non-empty string"),
    ],
)
def test_bad_sampling_arguments(smollm2, kwargs, message):
    with pytest.raises(wb.InvalidRequestError, match=message):
        smollm2.generate(["Hi"], **kwargs)
    with pytest.raises(wb.InvalidRequestError, match=message):
        smollm2.stream("Hi", **kwargs)


def test_bad_prompts_then_engine_still_answers(smollm2):
    with pytest.raises(wb.InvalidRequestError, match="prompt list is empty"):
        smollm2.generate([])
    with pytest.raises(wb.InvalidRequestError, match="prompt 1 is a int"):
        smollm2.generate(["ok", 3])
    with pytest.raises(wb.InvalidRequestError, match="with chat=False every prompt needs some text"):
        smollm2.generate([""], chat=False)
    too_long = "word " * 9000
    with pytest.raises(wb.InvalidRequestError, match=r"prompt has \d+ tokens but the context holds 8192"):
        smollm2.generate(["fine", too_long])
    assert "Paris" in smollm2.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text


def test_max_tokens_is_fitted_to_the_context():
    with wb.load("transformers", model="tiny-llama", max_model_len=64) as engine:
        prompt = "one two three four five six seven eight nine ten"
        room = 64 - len(engine.tokenizer(prompt).input_ids)
        result = engine.generate([prompt], max_tokens=500, temperature=0, chat=False)[0]
        assert len(result.token_ids) == room and result.finish_reason == "length"


def test_busy_engine_refuses_instead_of_hanging(smollm2):
    stream = smollm2.stream("Count to twenty.", max_tokens=32, temperature=0)
    next(stream)
    with pytest.raises(wb.WorkbenchError, match="busy"):
        smollm2.generate(["Hi"], max_tokens=2)
    stream.close()
    assert smollm2.generate(["Hi"], max_tokens=2)[0].metrics.generated_tokens >= 1


def test_errors_are_short():
    with pytest.raises(wb.WorkbenchError) as info:
        wb.load("nope")
    assert len(str(info.value).splitlines()) <= 2 and len(str(info.value)) < 300


def test_bad_workloads_get_clear_errors(load_shared):
    from workbench.workload import Request, make_workload

    engine = load_shared("transformers")
    with pytest.raises(wb.InvalidRequestError, match="request list is empty"):
        engine.run([])
    with pytest.raises(wb.InvalidRequestError, match="arrival_s must be a number >= 0"):
        Request("hi", arrival_s=-1)
    with pytest.raises(wb.InvalidRequestError, match="rate must be a positive number"):
        make_workload(n=2, rate=0)
    with pytest.raises(wb.InvalidRequestError, match="max_tokens must be an integer of at least 1"):
        engine.run([Request("hi", max_tokens=0)])
    trace = engine.run(["What is the capital of France?"])
    assert "Paris" in trace.results[0].text


def test_vllm_refusing_options_says_so_briefly():
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    with pytest.raises(wb.UnsupportedOptionError, match="vLLM refused these options"):
        wb.load("vllm", model="tiny-llama", num_blocks=2, block_size=32)  # 64 tokens cannot hold a 2048 context
