"""Notebooks executed by papermill, as `make report` does, and their recorded results checked."""

from __future__ import annotations

import time
from pathlib import Path

from workbench.cli import main as cli_main
from workbench.report import read_results

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_quickstart_report(tmp_path, capsys):
    start = time.perf_counter()
    assert cli_main(["report", str(NOTEBOOKS / "00_quickstart.ipynb"), "-p", "max_tokens", "16", "-o", str(tmp_path)]) == 0
    print(f"00_quickstart: {time.perf_counter() - start:.1f} s")
    results = read_results(tmp_path / "00_quickstart.ipynb")
    assert "Paris" in results["answer"]
    assert results["streamed"] == results["answer"]
    assert results["parameters"] == 134_515_008
    assert 0 < results["generated_tokens"] <= 16
    page = (tmp_path / "00_quickstart.html").read_text()
    assert "The capital of France is Paris." in page
