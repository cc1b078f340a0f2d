"""The `openai` engine against llama.cpp's server (`llama-server`, built by `make llama-server` from the llama.cpp
sources in llama-cpp-python's sdist) on the bundled GGUF file (SmolLM2-135M-Instruct, Q4_1, as shipped)."""

from __future__ import annotations

import pytest

import workbench as wb
from conftest import llama_server_or_skip
from workbench.errors import WorkbenchError
from workbench.servers import start_llamacpp_server
from workbench.workload import make_workload

pytestmark = pytest.mark.llama_server


@pytest.fixture(autouse=True, scope="module")
def _built():
    llama_server_or_skip()

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server():
    with start_llamacpp_server("smollm2-135m", parallel=4, context_per_request=1024) as running:
        yield running


@pytest.fixture(scope="module")
def remote(server):
    with wb.load("openai", url=server.url, model=server.model) as engine:
        yield engine


def test_answers_and_streams_with_the_same_chat_prompt(remote, load_shared):
    result = remote.generate(QUESTION, max_tokens=16, temperature=0)[0]
    # The GGUF's own chat template gives the prompt the workbench's engines build, token for token in count...
    chat = load_shared("transformers").tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert result.metrics.prompt_tokens == len(chat)
    assert result.metrics.generated_tokens == 16 and result.finish_reason == "length"
    # ...but not the float32 engines' answer: its Q4_1 kernels put "L" (log-prob -1.85) just above "The" (-2.09)
    assert result.text.startswith("L")
    assert "".join(remote.stream(QUESTION, max_tokens=16, temperature=0)) == result.text  # greedy is repeatable
    assert remote.server_kind == "llamacpp" and remote.info.engine_version == "llamacpp server"


def test_concurrent_streams_are_seen_decoding_together_in_its_metrics(remote):
    trace = remote.run(make_workload(n=6, output_tokens=32, seed=3))  # ignore_eos: llama.cpp takes it
    assert [r.metrics.generated_tokens for r in trace.results] == [32] * 6
    steps = trace.steps_df()
    assert steps["server_running"].max() > 1  # its slots decoded several requests at once
    assert steps["server_running"].max() <= 4  # and no more than it has slots
    assert trace.engine_counters["generation_tokens"] == 6 * 32


def test_a_prompt_longer_than_a_slot_is_a_clear_error(remote):
    with pytest.raises(wb.InvalidRequestError, match="refused the request \\(400\\)"):
        remote.generate("word " * 1500, max_tokens=4)  # "exceeds the available context size (1024 tokens)"
    assert remote.generate(QUESTION, max_tokens=4, temperature=0)[0].metrics.generated_tokens == 4  # still serving


def test_only_gguf_files_are_served():
    with pytest.raises(WorkbenchError, match="GGUF"):
        start_llamacpp_server("tiny-llama")


def test_the_api_key_goes_through_the_environment(monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEST_LLAMA_KEY", "k-" + "9" * 20)
    with start_llamacpp_server("smollm2-135m", parallel=1, context_per_request=512,
                               api_key_env="WORKBENCH_TEST_LLAMA_KEY") as keyed:
        assert "k-999" not in " ".join(keyed.process.args)  # not on the command line
        with pytest.raises(WorkbenchError, match="401.*WRONG_KEY_ENV"):
            wb.load("openai", url=keyed.url, model=keyed.model, api_key_env="WRONG_KEY_ENV")
        with wb.load("openai", url=keyed.url, model=keyed.model, api_key_env="WORKBENCH_TEST_LLAMA_KEY") as engine:
            assert engine.generate(QUESTION, max_tokens=2, temperature=0)[0].metrics.generated_tokens == 2
