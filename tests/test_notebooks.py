"""Notebooks executed by papermill, as `make report` does, and their recorded results checked."""

from __future__ import annotations

import time

from conftest import NOTEBOOK_SECONDS, NOTEBOOKS
from workbench.report import read_results, run_notebook


def test_quickstart_report(quickstart_report):
    results = read_results(quickstart_report / "00_quickstart.ipynb")
    assert "Paris" in results["answer"]
    assert results["streamed"] == results["answer"]
    assert results["parameters"] == 134_515_008
    assert 0 < results["generated_tokens"] <= 16
    assert results["steps"] > 6
    if results["engine"] != "transformers":  # a paged cache: the shared system prompt shows as shared blocks
        assert results["busiest_blocks_used"] > 0 and results["shared_blocks"] > 0
    page = (quickstart_report / "00_quickstart.html").read_text()
    assert "The capital of France is Paris." in page
    assert page.count('class="plotly-graph-div"') == results["static_figures"]
    assert len(page) < 12_000_000  # plotly.js once (4.6 MB), no widget bundles


def test_paged_attention_notebook(tmp_path):
    start = time.perf_counter()
    executed, page = run_notebook(NOTEBOOKS / "02_paged_attention.ipynb", out_dir=tmp_path, progress_bar=False)
    NOTEBOOK_SECONDS["02_paged_attention"] = time.perf_counter() - start
    results = read_results(executed)
    assert results["shared_blocks"] > 0 and results["cached_tokens"] >= results["block_size"]
    assert results["preemptions"] > 0 and results["preemptions"] == results["vllm_num_preemptions"]
    assert results["waste_paged_pct"] < results["waste_contiguous_pct"]
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def test_continuous_batching_notebook(tmp_path):
    start = time.perf_counter()
    executed, page = run_notebook(NOTEBOOKS / "03_continuous_batching.ipynb", out_dir=tmp_path, progress_bar=False)
    NOTEBOOK_SECONDS["03_continuous_batching"] = time.perf_counter() - start
    results = read_results(executed)
    assert set(results["engines"]) >= {"transformers", "transformers-paged"}
    for name, ttft in results["ttft_continuous_s"].items():
        assert ttft < results["ttft_static_s"], f"{name}: continuous batching's mean TTFT is not below static's"
    assert results["max_running"]["transformers-paged"] > 1  # requests really ran together
    limits = results["ttft_by_batch_limit"]
    assert limits["2"] > limits["8"]  # a tight cap keeps arrivals waiting
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]
