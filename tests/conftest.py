"""Shared fixtures: each real engine is loaded once per test session (loading vLLM costs ~20 s here)."""

from __future__ import annotations

import importlib.util
import os
import secrets
import time
from pathlib import Path

import pytest

import workbench as wb
from workbench.cli import main as cli_main
from workbench.report import run_notebook
from workbench.servers import start_vllm_server

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

ENGINES = ["transformers", "transformers-paged", "vllm", "deepspeed"]

# The fast layer (`pytest -m "not slow"`): modules that load no engine, model, server, notebook or browser. Every
# other test is marked slow here.
FAST_MODULES = {"test_arrivals", "test_interface", "test_layers", "test_packaging", "test_registry", "test_sysmem",
                "test_saved_traces", "test_server_metrics", "test_serving_metrics", "test_tgi_requests",
                "test_workload"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)


def llama_server_or_skip() -> None:
    """Skip unless llama.cpp's llama-server is built (`make test` builds it before the tests)."""
    from workbench.errors import WorkbenchError
    from workbench.servers import llama_server_binary

    try:
        llama_server_binary()
    except WorkbenchError as exc:
        pytest.skip(str(exc))


def assert_client_matches_server(m: dict, at: object = None) -> None:
    """Assert that one run's client means (`serving_metrics`) are the vLLM server's own histograms' means.

    vLLM starts a request's clock when it has parsed and rendered it; the client starts it at sending. That wait
    (it grows with the requests arriving together and the load on the cores) comes before the first token and the
    last alike, so the client's TTFT and E2E exceed the server's by one offset, and its ITL matches outright.
    """
    seen = (at, {name: f"client {m[f'mean_{name}_ms']:.1f} ms, server {m[f'engine_mean_{name}_ms']:.1f} ms"
                 for name in ("ttft", "itl", "e2el")})
    for name in ("itl", "e2el"):
        client, server = m[f"mean_{name}_ms"], m[f"engine_mean_{name}_ms"]
        assert abs(client - server) < max(0.05 * server, 15), seen
    ttft_offset = m["mean_ttft_ms"] - m["engine_mean_ttft_ms"]
    e2el_offset = m["mean_e2el_ms"] - m["engine_mean_e2el_ms"]
    assert 0 <= ttft_offset < max(0.15 * m["engine_mean_ttft_ms"], 15), seen
    assert abs(ttft_offset - e2el_offset) < 15 + 0.01 * m["engine_mean_ttft_ms"], seen


HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def engine_params():
    missing = {"vllm": not HAVE_VLLM, "deepspeed": not HAVE_DEEPSPEED}
    return [pytest.param(name, marks=pytest.mark.skipif(missing.get(name, False), reason=f"{name} is not installed"))
            for name in ENGINES]


_loaded: dict[tuple[str, str], wb.Engine] = {}


@pytest.fixture(scope="session")
def load_shared():
    """Load (engine, model) once for the whole session and close everything at the end."""

    def get(engine: str, model: str = "smollm2-135m", **options) -> wb.Engine:
        key = (engine, model)
        if key not in _loaded:
            _loaded[key] = wb.load(engine, model=model, **options)
        return _loaded[key]

    yield get
    for engine in _loaded.values():
        engine.close()
    _loaded.clear()


@pytest.fixture(params=engine_params())
def smollm2(request, load_shared) -> wb.Engine:
    """The bundled real model in each engine."""
    return load_shared(request.param)


NOTEBOOK_SECONDS: dict[str, float] = {}  # how long each notebook took to execute, printed at the end of the run


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_SECONDS:
        terminalreporter.section("notebooks executed")
        for name, seconds in NOTEBOOK_SECONDS.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")
        terminalreporter.write_line(f"all notebooks: {sum(NOTEBOOK_SECONDS.values()):.1f} s")


@pytest.fixture(scope="session")
def quickstart_report(tmp_path_factory) -> Path:
    """00_quickstart executed once per session through the `workbench report` command: its folder."""
    out = tmp_path_factory.mktemp("reports")
    start = time.perf_counter()
    assert cli_main(["report", str(NOTEBOOKS / "00_quickstart.ipynb"), "-p", "max_tokens", "16", "-o", str(out)]) == 0
    NOTEBOOK_SECONDS["00_quickstart"] = time.perf_counter() - start
    return out


# Notebooks that watch a server are given the session's vLLM servers (their `url` parameter, as a user points them
# at a server of theirs) rather than each starting one more: 06 the first, 07 the second, whose batch cap is 07's
# max_batch_size. Each notebook reads the server's counters as differences over its own run.
SERVER_NOTEBOOKS = {"06_serving_dashboard": 0, "07_load_sweep": 1}


@pytest.fixture(scope="session")
def notebook_report(tmp_path_factory, session_servers):
    """`notebook_report(name)` executes notebooks/NAME.ipynb once per session, with its default parameters (and a
    session server's `url` for SERVER_NOTEBOOKS), and returns (executed notebook, HTML page); the notebook tests
    check the results, the browser test the page."""
    out = tmp_path_factory.mktemp("notebook-reports")
    done: dict[str, tuple[Path, Path]] = {}

    def run(name: str) -> tuple[Path, Path]:
        if name not in done:
            parameters = {}
            if session_servers and name in SERVER_NOTEBOOKS:
                parameters = {"url": session_servers[SERVER_NOTEBOOKS[name]].url, "api_key_env": SERVER_KEY_ENV}
            start = time.perf_counter()
            done[name] = run_notebook(NOTEBOOKS / f"{name}.ipynb", parameters, out_dir=out, progress_bar=False)
            NOTEBOOK_SECONDS[name] = time.perf_counter() - start
        return done[name]

    return run


SERVER_KEY_ENV = "WORKBENCH_TEST_SERVER_KEY"


@pytest.fixture(scope="session")
def session_servers():
    """Two of vLLM's OpenAI servers on localhost (SmolLM2, float32), started together once per session (none
    without vLLM); each asks for an API key, read from an environment variable on both sides. The second caps its
    batch at 4 requests (notebook 07's max_batch_size)."""
    if not HAVE_VLLM:
        yield None
        return
    os.environ.setdefault(SERVER_KEY_ENV, secrets.token_hex(16))
    started = [start_vllm_server("smollm2-135m", api_key_env=SERVER_KEY_ENV, max_model_len=2048, kv_cache_gb=0.5,
                                 timeout_s=None, extra_args=extra) for extra in ((), ("--max-num-seqs", "4"))]
    try:
        for server in started:
            server.wait_ready(300)
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def vllm_servers(session_servers):
    """The session's two vLLM servers: the openai engine's tests use the first, the replica tests both (and stop
    the second last)."""
    if not session_servers:
        pytest.skip("vllm is not installed (the test servers are vLLM's)")
    return session_servers
