"""Notebooks as reports: record a notebook's key results, and execute a notebook into `reports/` with papermill.

In a notebook:

>>> from workbench.report import record
>>> record(answer="Paris", tokens_per_s=211.0)      # doctest: +SKIP

and a test, or anyone, reads them back from the executed copy with `read_results(path)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RESULTS_MIME = "application/vnd.workbench.results+json"


def record(**values: Any) -> None:
    """Show `values` in the notebook and store them in its output, where `read_results` finds them.

    Nothing is returned, so a `record(...)` as a cell's last line shows the values once."""
    from IPython.display import display

    data = _json_safe(json.loads(json.dumps(values, default=str)))  # what is stored is what JSON can hold
    display({RESULTS_MIME: data, "text/plain": _summary(data)}, raw=True)


def _json_safe(value: Any) -> Any:
    """NaN and infinities (pandas' missing values) as None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _summary(data: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in data.items())


def read_results(notebook: str | Path) -> dict[str, Any]:
    """Every value `record` stored in an executed notebook, later cells overriding earlier ones."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    results: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if RESULTS_MIME in data:
                results.update(data[RESULTS_MIME])
    return results


def run_notebook(notebook: str | Path, parameters: dict[str, Any] | None = None,
                 out_dir: str | Path = "reports", progress_bar: bool = True) -> tuple[Path, Path]:
    """Execute `notebook` with papermill into `out_dir`, as an executed notebook and a standalone HTML page.

    >>> run_notebook("notebooks/00_quickstart.ipynb", {"max_tokens": 32})      # doctest: +SKIP
    (PosixPath('reports/00_quickstart.ipynb'), PosixPath('reports/00_quickstart.html'))
    """
    import papermill
    from nbconvert import HTMLExporter

    source = Path(notebook)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / source.name
    papermill.execute_notebook(str(source), str(executed), parameters=parameters or {},
                               progress_bar=progress_bar, cwd=str(source.parent))
    _drop_widget_state(executed)
    html, _ = HTMLExporter().from_filename(str(executed))
    page = executed.with_suffix(".html")
    page.write_text(html, encoding="utf-8")
    return executed, page


def _drop_widget_state(notebook: Path) -> None:
    """Remove the saved widget state from an executed notebook.

    A report's figures are static renders; the widget state could only draw the live widgets with a CDN at hand,
    and each plotly widget carries its whole JavaScript bundle in it (about 5 MB apiece).
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    if nb.metadata.pop("widgets", None) is not None:
        nbformat.write(nb, str(notebook))
