"""Engines in their own process: the kernel survives what an engine's process does, close() gives it all back,
engines run side by side, and known native limits are short errors before they can crash anything."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import threading
import time

import pytest

import workbench as wb
from conftest import HAVE_VLLM
from workbench.models import resolve_model
from workbench.workload import make_workload

QUESTION = "What is the capital of France?"
LONG = make_workload(n=4, output_tokens=400, seed=21)  # long enough to be killed midway


def answers(engine) -> str:
    return engine.generate(QUESTION, max_tokens=12, temperature=0)[0].text


def test_an_engine_runs_in_a_process_of_its_own_and_close_gives_it_back():
    engine = wb.load("transformers", model="smollm2-135m")
    assert engine.process.pid != os.getpid() and engine.process.poll() is None
    assert "Paris" in answers(engine)
    assert engine.info.parameters == 134_515_008 and engine.kv_bytes_per_token == 46080
    trace = engine.run(make_workload(n=3, output_tokens=8, seed=2))
    assert trace.steps and [r.metrics.generated_tokens for r in trace.results] == [8] * 3
    report = engine.close()
    assert engine.process.poll() == 0 and report.worker_exit_code == 0
    # the weights (500 MiB) lived in the worker: the kernel holds about what it held before the load
    assert report.kernel_grew_by < 100 * 2**20
    with pytest.raises(wb.WorkbenchError, match="closed"):
        answers(engine)
    with pytest.raises(AttributeError, match="'hf_model'.* worker process .* isolate=False"):
        engine.hf_model  # noqa: B018 - the internals are in the worker


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_midway_is_an_error_and_the_next_load_works(sig):
    engine = wb.load("transformers-paged", model="tiny-llama")
    threading.Timer(1.5, os.kill, args=(engine.process.pid, sig)).start()
    with pytest.raises(wb.EngineCrashedError, match=f"died of {sig.name} while running 4 request") as error:
        engine.run(LONG)
    assert "load a new one" in str(error.value)
    with pytest.raises(wb.EngineCrashedError, match="crashed earlier"):
        answers(engine)
    engine.close()
    with wb.load("transformers-paged", model="tiny-llama") as again:
        assert again.generate("Hello", max_tokens=4)[0].metrics.generated_tokens == 4


def test_a_worker_over_its_memory_limit_does_not_take_the_kernel_with_it():
    engine = wb.load("transformers", model="smollm2-135m")
    used = int(open(f"/proc/{engine.process.pid}/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.prlimit(engine.process.pid, resource.RLIMIT_AS, (used + (64 << 20), used + (64 << 20)))
    big = [QUESTION * 30] * 48  # a static batch whose cache grows past the limit
    with pytest.raises((wb.WorkbenchError, RuntimeError, MemoryError)):
        engine.generate(big, max_tokens=256, temperature=0)
    engine.close()
    with wb.load("transformers", model="smollm2-135m") as again:
        assert "Paris" in answers(again)


def test_two_engines_side_by_side_each_in_its_own_process():
    with wb.load("transformers", model="tiny-llama") as static, \
            wb.load("transformers-paged", model="tiny-llama") as paged:
        assert static.process.pid != paged.process.pid
        workload = make_workload(n=4, output_tokens=8, rate=8.0, seed=3)
        a, b = static.run(workload), paged.run(workload)
        assert [r.token_ids for r in a.results] == [r.token_ids for r in b.results]  # same weights, greedy
        assert a.engine == "transformers" and b.engine == "transformers-paged"


def test_stop_reaches_the_engine_in_its_process():
    with wb.load("transformers-paged", model="tiny-llama") as engine:
        # Stopped from the kernel once the run is seen stepping: a timer can fire before the run has started (the
        # first run reads the paged pool first), and a stop while nothing runs does nothing.
        trace = engine.run(LONG, on_step=lambda snapshot: snapshot.step == 5 and engine.stop())
        assert all(r.finish_reason == "abort" for r in trace.results)
        assert all(len(r.token_ids) < 400 for r in trace.results)
        assert engine.generate("Hello", max_tokens=3)[0].metrics.generated_tokens == 3


def test_in_this_process_when_asked():
    with wb.load("transformers", model="tiny-llama", isolate=False) as engine:
        assert not hasattr(engine, "process") and engine.hf_model is not None


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
def test_a_head_size_vllms_cpu_attention_has_no_kernel_for_is_refused_before_loading(tmp_path):
    import json

    folder = tmp_path / "head16"
    shutil.copytree(resolve_model("tiny-llama").path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(wb.UnsupportedOptionError, match="no kernel for this model's head size 16.*transformers"):
        wb.load("vllm", model=str(folder))  # the worker refuses it, and says why, here
    assert time.perf_counter() - start < 90  # refused before vLLM builds anything


def test_the_next_load_takes_a_spare_worker_that_imported_the_engines_libraries_ahead(monkeypatch):
    from workbench.engines import host

    def spare_for(name: str):
        deadline = time.time() + 120
        while name not in host._SPARES and time.time() < deadline:  # started in the background
            time.sleep(0.2)
        return host._SPARES[name]

    with wb.load("transformers", model="tiny-llama") as engine:
        first = answers(engine)
    spare = spare_for("transformers")
    assert "torch" in spare.warm and "transformers" in spare.warm
    with wb.load("transformers", model="tiny-llama") as engine:
        assert engine.warm_worker and engine.process.pid == spare.process.pid
        assert answers(engine) == first
        for thread in os.listdir(f"/proc/{engine.process.pid}/task"):  # back at normal priority, every thread
            assert os.sched_getscheduler(int(thread)) == os.SCHED_OTHER
    spare = spare_for("transformers")
    with wb.load("transformers-paged", model="tiny-llama") as engine:  # the same libraries: it takes the spare
        assert engine.warm_worker and engine.process.pid == spare.process.pid
    spare_for("transformers-paged")
    monkeypatch.setenv("WORKBENCH_SOME_SETTING", "1")  # reaches the spare at its load: it is still taken
    with wb.load("transformers", model="tiny-llama") as engine:
        assert engine.warm_worker
    spare_for("transformers")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read as torch is imported: the spare imported it with the old one
    with wb.load("transformers", model="tiny-llama") as engine:
        assert not engine.warm_worker
    if HAVE_VLLM:  # a spare that imported vLLM is left for vLLM: another engine starts a worker of its own
        spare_for("transformers")
        with host._SPARES_LOCK:
            old = host._SPARES.pop("transformers")
            host._SPARES["vllm"] = host._spawn(("torch", "vllm"))
        host._end(old)
        with wb.load("transformers", model="tiny-llama") as engine:
            assert not engine.warm_worker
    spare_for("transformers")
    process = host._SPARES["transformers"].process
    assert host.end_spare_workers() >= 1 and not host._SPARES and process.poll() is not None
    monkeypatch.setenv("WORKBENCH_SPARE_WORKERS", "0")  # no spares at all
    with wb.load("transformers", model="tiny-llama"):
        pass
    time.sleep(1)
    assert not host._SPARES
