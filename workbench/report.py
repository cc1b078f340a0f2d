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


def _summary(data: dict[str, Any], width: int = 160) -> str:
    """One line per value, long ones cut (the whole value is stored, for `read_results`)."""
    lines = []
    for key, value in data.items():
        text = str(value)
        lines.append(f"{key}: {text if len(text) <= width else text[:width] + ' ...'}")
    return "\n".join(lines)


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

    A notebook with an `output_dir` parameter is given `out_dir` there (unless `parameters` say otherwise), so the
    files it writes (data, logs) land beside its report.

    >>> run_notebook("notebooks/00_quickstart.ipynb", {"max_tokens": 32})      # doctest: +SKIP
    (PosixPath('reports/00_quickstart.ipynb'), PosixPath('reports/00_quickstart.html'))
    """
    import papermill
    from nbconvert import HTMLExporter

    source = Path(notebook)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / source.name
    parameters = dict(parameters or {})
    if "output_dir" in papermill.inspect_notebook(str(source)):
        parameters.setdefault("output_dir", str(out.resolve()))
    papermill.execute_notebook(str(source), str(executed), parameters=parameters,
                               progress_bar=progress_bar, cwd=str(source.parent))
    _drop_widget_state(executed)
    html, _ = HTMLExporter().from_filename(str(executed))
    page = executed.with_suffix(".html")
    page.write_text(html, encoding="utf-8")
    return executed, page


def _drop_widget_state(notebook: Path) -> None:
    """Remove widgets from an executed notebook: their saved state, and the outputs that show a widget.

    A report's figures are static renders; the widget state could only draw the live widgets with a CDN at hand,
    and each plotly widget carries its whole JavaScript bundle in it (about 5 MB apiece). A widget's output keeps
    only its text as it was when first shown (a progress bar at 0%), which would mislead in a report.
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        kept = [o for o in outputs if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
        if len(kept) != len(outputs):
            cell["outputs"] = kept
            changed = True
    if changed:
        nbformat.write(nb, str(notebook))
