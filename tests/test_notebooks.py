"""Notebooks executed by papermill, as `make report` does, and their recorded results checked."""

from __future__ import annotations

from workbench.report import read_results


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
