"""The `openai` engine against a second real OpenAI-compatible server: Transformers' own (`transformers serve`).

It lists no models (it loads them on demand), knows a model by its folder, has no /metrics and refuses fields it
does not know: what the engine must cope with beyond vLLM's server.
"""

from __future__ import annotations

import importlib.util

import pytest

import workbench as wb
from workbench.servers import start_transformers_server
from workbench.workload import make_workload

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")),
    reason="transformers serve needs fastapi and uvicorn (pip install 'transformers[serving]')")

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server():
    with start_transformers_server("smollm2-135m") as running:
        yield running


@pytest.fixture(scope="module")
def remote(server):
    with wb.load("openai", url=server.url, model=server.model) as engine:
        yield engine


def test_answers_like_the_in_process_transformers_engine(remote, load_shared):
    result = remote.generate(QUESTION, max_tokens=16, temperature=0)[0]
    local = load_shared("transformers").generate(QUESTION, max_tokens=16, temperature=0)[0]
    assert result.text == local.text == "The capital of France is Paris."
    assert result.metrics.prompt_tokens == local.metrics.prompt_tokens  # the same chat template, on the server
    assert result.metrics.generated_tokens == len(local.token_ids)
    assert "".join(remote.stream(QUESTION, max_tokens=16, temperature=0)) == result.text
    assert remote.max_model_len == 8192  # the server does not say: from the model's config


def test_a_run_without_server_metrics_keeps_the_clients_view(remote):
    trace = remote.run(make_workload(n=4, output_tokens=24, seed=1, ignore_eos=False))
    assert all(0 < r.metrics.generated_tokens <= 24 for r in trace.results)
    steps = trace.steps_df()
    assert len(steps) > 3 and "server_running" not in steps.columns  # polled, with nothing from the server
    states = trace.request_steps_df()
    assert sorted(states[states.state == "finished"].request_id) == ["r0", "r1", "r2", "r3"]  # each once
    # Without --continuous-batching this server answers one request at a time; the client sees the others wait.
    assert steps["decode"].max() == 1 and steps["waiting"].max() > 0


def test_what_this_server_refuses_is_a_clear_error(server, remote):
    with wb.load("openai", url=server.url, model="smollm2-135m") as wrong:  # it lists nothing, so load accepts it
        with pytest.raises(wb.InvalidRequestError, match="pinned"):
            wrong.generate("Hi", max_tokens=2)
    with pytest.raises(wb.InvalidRequestError, match="ignore_eos"):  # an extension vLLM takes and this refuses
        remote.run(make_workload(n=2, output_tokens=4))
    assert remote.generate(QUESTION, max_tokens=16, temperature=0)[0].text == "The capital of France is Paris."
