"""Data parallelism as users run it: one `openai` engine over two real vLLM servers (round robin), each server's
/metrics in the trace; a replica that goes down is named and the other keeps serving. The servers are the session's
(conftest); the second is stopped here, last."""

from __future__ import annotations

import pytest

import workbench as wb
from conftest import HAVE_VLLM, SERVER_KEY_ENV
from workbench.servers import free_port
from workbench.workload import make_workload

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (the servers are vLLM's)")


@pytest.fixture(scope="module")
def servers(vllm_servers):
    return vllm_servers


def test_requests_go_round_robin_and_each_replicas_metrics_are_kept(servers):
    with wb.load("openai", url=[s.url for s in servers], model="smollm2-135m", api_key_env=SERVER_KEY_ENV) as engine:
        trace = engine.run(make_workload(n=8, output_tokens=16, seed=5))
        assert [r.metrics.generated_tokens for r in trace.results] == [16] * 8
        counters = trace.engine_counters
        assert counters["replica0:generation_tokens"] == counters["replica1:generation_tokens"] == 4 * 16
        assert counters["generation_tokens"] == 8 * 16
        steps = trace.steps_df()
        assert steps["replica0:server_running"].max() > 0 and steps["replica1:server_running"].max() > 0
        assert (steps["server_running"] == steps["replica0:server_running"] + steps["replica1:server_running"]).all()
        pools = [n for _, n in engine._cache]
        assert trace.facts.num_blocks == sum(pools) and all(len(s.blocks) == sum(pools) for s in trace.steps)
        assert engine.info.device == f"{servers[0].url}, {servers[1].url}"


def test_a_replica_that_goes_down_is_named_and_the_other_serves_on(servers):
    with wb.load("openai", url=[s.url for s in servers], model="smollm2-135m", api_key_env=SERVER_KEY_ENV) as engine:
        servers[1].kill()
        with pytest.warns(UserWarning, match=f"{servers[1].url} stopped answering"):
            trace = engine.run(make_workload(n=6, output_tokens=8, seed=6))
        failed = [r for r in trace.results if r.finish_reason == "error"]
        served = [r for r in trace.results if r.finish_reason == "length"]
        assert failed and len(failed) + len(served) == 6
        assert all(servers[1].url in r.error for r in failed)
        assert all(r.metrics.generated_tokens == 8 for r in served)
        assert trace.engine_counters["replica0:generation_tokens"] == 8 * len(served)
        # the next run asks the dead replica first, and goes to the live one only
        assert "Paris" in engine.generate("What is the capital of France?", max_tokens=12, temperature=0)[0].text


def test_a_replica_down_at_load_is_named(servers):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(wb.WorkbenchError, match=f"cannot reach a server at {dead}"):
        wb.load("openai", url=[servers[0].url, dead], model="smollm2-135m", api_key_env=SERVER_KEY_ENV)
