"""The `openai` engine against a real vLLM OpenAI-compatible server started on localhost (SmolLM2, float32).

The server requires an API key, read from an environment variable on both sides. The last test kills a server of
its own mid-stream.
"""

from __future__ import annotations

import os
import threading

import pytest

import workbench as wb
from conftest import HAVE_VLLM, SERVER_KEY_ENV, assert_client_matches_server, llama_server_or_skip
from workbench.analysis import serving_metrics
from workbench.servers import free_port, start_llamacpp_server
from workbench.widgets.figures import STATE_CODES, memory_series, throughput_series, timeline_matrix
from workbench.workload import Request, make_workload

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (the test server is vLLM's)")

KEY_ENV = SERVER_KEY_ENV
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(vllm_servers):
    return vllm_servers[0]


@pytest.fixture(scope="module")
def remote(server):
    with wb.load("openai", url=server.url, model="smollm2-135m", api_key_env=KEY_ENV) as engine:
        yield engine


def test_generate_and_stream_answer_like_the_in_process_engine(remote, load_shared):
    result = remote.generate(QUESTION, max_tokens=16, temperature=0)[0]
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"
    assert result.metrics.prompt_tokens > 10 and 0 < result.metrics.generated_tokens <= 16
    assert "".join(remote.stream(QUESTION, max_tokens=16, temperature=0)) == result.text
    local = load_shared("vllm").generate(QUESTION, max_tokens=16, temperature=0)[0]
    assert local.text == result.text and local.metrics.prompt_tokens == result.metrics.prompt_tokens


def test_concurrent_streams_are_seen_running_together_in_the_servers_metrics(remote):
    workload = make_workload(n=8, output_tokens=64, seed=1)  # all at once, each exactly 64 tokens
    trace = remote.run(workload)
    assert [r.metrics.generated_tokens for r in trace.results] == [64] * 8
    assert all(r.finish_reason == "length" for r in trace.results)
    steps = trace.steps_df()
    assert steps["server_running"].max() > 1  # from vllm:num_requests_running, not from the client
    assert steps["kv_usage"].max() > 0
    assert trace.engine_counters["generation_tokens"] == 8 * 64
    assert all(q.prompt_tokens > 0 for q in trace.requests)
    # what the views draw from a server's trace: requests decoding together, KV in use, tokens per second
    _, _, states = timeline_matrix(trace)
    decoding = [sum(row[c] == STATE_CODES["decode"] for row in states) for c in range(len(states[0]))]
    assert max(decoding) > 1
    assert max(memory_series(trace)["KV in use"]) > 0
    assert max(throughput_series(trace)["tokens_per_s"]) > 0


NOTES = ("The engine reads each prompt in blocks of tokens and keeps their keys and values in a cache so that every "
         "new token attends to all earlier ones without computing them again while other requests wait their turn in "
         "the queue until memory frees. ")
PROMPT = " ".join(("Summarize the following notes in one paragraph. " + NOTES * 3).split()[:104])  # 141 tokens


@pytest.mark.parametrize("concurrent", [8, 64])
def test_the_clients_latencies_are_the_servers_own_plus_one_arrival_offset(remote, concurrent):
    trace = remote.run([Request(PROMPT, max_tokens=64, ignore_eos=True) for _ in range(concurrent)])
    assert [r.metrics.prompt_tokens for r in trace.results] == [141] * concurrent
    assert [r.metrics.generated_tokens for r in trace.results] == [64] * concurrent
    counters = trace.engine_counters  # the server's histograms, read from /metrics before and after the run
    assert counters["ttft_count"] == counters["e2el_count"] == concurrent
    assert counters["itl_count"] == concurrent * 63
    m = serving_metrics(trace)
    assert_client_matches_server(m)
    assert m["max_concurrent_requests"] == concurrent


def test_a_closed_loop_against_a_server(remote):
    trace = remote.run(make_workload(n=6, output_tokens=16, seed=4), max_concurrency=2)
    assert [r.metrics.generated_tokens for r in trace.results] == [16] * 6
    assert trace.steps_df()["server_running"].max() <= 2  # the server never saw more than two at once
    assert min(r.metrics.queue_s for r in trace.results[2:]) > 0


def test_stop_aborts_a_remote_run_and_the_engine_stays_usable(remote):
    threading.Timer(1.0, remote.stop).start()
    trace = remote.run(make_workload(n=3, output_tokens=400, seed=2))
    assert all(r.finish_reason == "abort" for r in trace.results)
    assert "Paris" in remote.generate(QUESTION, max_tokens=16, temperature=0)[0].text


def test_the_api_key_is_written_nowhere(remote, tmp_path):
    key = os.environ[KEY_ENV]
    trace = remote.run(["Hello"], record=True)
    saved = trace.save(tmp_path / "trace.jsonl").read_text()
    for text in (saved, repr(remote), repr(remote.info), repr(remote.options)):
        assert key not in text


def test_a_wrong_key_is_a_401_naming_the_variable(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    with pytest.raises(wb.WorkbenchError, match=f"401.*{KEY_ENV}"):
        wb.load("openai", url=server.url, api_key_env=KEY_ENV)


def test_a_server_that_is_down():
    with pytest.raises(wb.WorkbenchError, match="cannot reach a server"):
        wb.load("openai", url=f"http://127.0.0.1:{free_port()}/v1")


def test_a_wrong_url(server):
    with pytest.raises(wb.WorkbenchError, match="no OpenAI-compatible API"):
        wb.load("openai", url=f"{server.root}/not/the/api", api_key_env=KEY_ENV)


def test_a_model_the_server_does_not_serve(server):
    with pytest.raises(wb.InvalidRequestError, match="does not serve model 'gpt-4'; it serves: smollm2-135m"):
        wb.load("openai", url=server.url, model="gpt-4", api_key_env=KEY_ENV)


def test_a_server_slower_than_the_timeout(server, remote):
    slow = wb.load("openai", url=server.url, api_key_env=KEY_ENV, timeout_s=0.3)
    long_prompt = "Summarize this. " + "The quick brown fox jumps over the lazy dog. " * 150  # a long prefill
    for _ in range(2):  # the second time proves the first left the engine free (not "busy")
        with pytest.raises(wb.WorkbenchError, match="did not answer within 0.3 s"):
            slow.generate(long_prompt, max_tokens=8)
    assert "Paris" in remote.generate(QUESTION, max_tokens=16, temperature=0)[0].text


@pytest.mark.llama_server
def test_a_stream_cut_off_midway():
    llama_server_or_skip()
    # a server of its own (llama.cpp's starts in a second): this one dies mid-answer
    with start_llamacpp_server("smollm2-135m", parallel=1, context_per_request=1024) as dying, \
            wb.load("openai", url=dying.url, model=dying.model) as remote:
        pieces = remote.stream("Tell me a very long story.", max_tokens=500, temperature=0)
        received = [next(pieces) for _ in range(3)]
        dying.kill()
        with pytest.raises(wb.WorkbenchError, match="cut the stream off|cannot reach"):
            received.extend(pieces)
        assert received
        with pytest.raises(wb.WorkbenchError, match="cannot reach a server"):  # a clear error again, not "busy"
            remote.generate(QUESTION, max_tokens=4)
