"""Real-browser tests: JupyterLab driven by Playwright in Debian's Chromium (no browser download, no network).

1. The quickstart notebook opened in JupyterLab, all cells run, then the Workbench's Load and Run pressed: the
   generated text must appear and the live KV block map must draw. Screenshots go to reports/browser/.
2. The HTML report of every notebook with figures opened with the network off: every figure must be drawn.

`make test` installs chromium with apt-get when it is missing. Without it these tests fail under CI (CI=true) and
are skipped elsewhere.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workbench.report import read_results

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "reports" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]

if not Path(CHROMIUM).exists():
    message = "chromium is not installed: `apt-get install chromium` (make test installs it)"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """A JupyterLab server on localhost over a copy of notebooks/ (so the sources stay clean): its URL and token."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", root, dirs_exist_ok=True)
    _set_parameter(root / "00_quickstart.ipynb", "engine", "transformers-paged")
    port, token = _free_port(), secrets.token_hex(16)
    log = (root / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"JupyterLab did not start: see {root / 'jupyterlab.log'}") from None
            time.sleep(0.5)
    yield base, token
    server.terminate()
    server.wait(30)


def _set_parameter(notebook: Path, name: str, value: str) -> None:
    """Change one line of a notebook's parameters cell, as a user does before running it (papermill runs the
    notebook with vLLM; here the quicker transformers-paged loads, and draws the same live KV block map)."""
    import json

    content = json.loads(notebook.read_text())
    cell = next(c for c in content["cells"] if "parameters" in c["metadata"].get("tags", []))
    lines = "".join(cell["source"]).splitlines(keepends=True)
    cell["source"] = [f"{name} = {value!r}\n" if line.startswith(f"{name} = ") else line for line in lines]
    assert cell["source"] != lines, f"no parameter {name!r} in {notebook.name}"
    notebook.write_text(json.dumps(content, indent=1))


def test_quickstart_in_jupyterlab_load_and_run_the_workbench(browser, jupyterlab):
    base, token = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{base}/lab/tree/00_quickstart.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        kernel_idle = page.locator(".jp-StatusBar-TextItem", has_text="| Idle")
        kernel_idle.wait_for(timeout=120_000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()

        workbench = page.locator(".jp-Cell").last
        load = workbench.locator("button.widget-button[title='Load']")
        load.wait_for(timeout=600_000)  # the notebook above it loads an engine and serves a workload first
        kernel_idle.wait_for(timeout=120_000)
        workbench.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "1-notebook-ran.png"), full_page=False)
        assert workbench.locator(".gtitle").count() == 0  # the KV map is empty before any run

        load.click()
        workbench.get_by_text("loaded in").wait_for(timeout=300_000)
        page.screenshot(path=str(ARTIFACTS / "2-loaded.png"))
        workbench.locator("button.widget-button[title='Run']").click()
        workbench.locator(".workbench-texts", has_text="Paris").wait_for(timeout=300_000)
        kv_map = workbench.locator(".js-plotly-plot").first
        kv_map.locator(".gtitle", has_text="KV cache blocks, step").wait_for(timeout=60_000)
        assert kv_map.locator(".point").count() > 0
        workbench.locator(".widget-html-content", has_text="tokens/s").wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "3-ran.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
        raise
    finally:
        page.close()


@pytest.mark.parametrize("name", ["00_quickstart", "02_paged_attention", "03_continuous_batching", "04_memory",
                                  "05_engine_report", "06_serving_dashboard", "07_load_sweep", "08_parallelism",
                                  "09_precision_and_quantization", "10_compilation",
                                  "11_speculative_decoding"])
def test_html_report_draws_every_figure_offline(browser, quickstart_report, notebook_report, name):
    if name == "00_quickstart":  # executed through the `workbench report` command
        executed, html = quickstart_report / f"{name}.ipynb", quickstart_report / f"{name}.html"
    else:
        executed, html = notebook_report(name)
    expected = read_results(executed)["static_figures"]
    context = browser.new_context(offline=True)
    asked: list[str] = []

    def no_network(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            asked.append(route.request.url)
            route.abort()

    context.route("**/*", no_network)
    page = context.new_page()
    try:
        page.goto(html.as_uri(), wait_until="load", timeout=120_000)
        page.wait_for_function(
            f"document.querySelectorAll('.plotly-graph-div .main-svg').length >= {expected}", timeout=60_000)
        figures = page.locator(".plotly-graph-div")
        assert figures.count() == expected
        for i in range(expected):  # drawn: an svg with at least one trace in it
            assert figures.nth(i).locator(".main-svg").count() > 0
            assert figures.nth(i).locator(".trace, .hm, .heatmaplayer image, .scatterlayer path").count() > 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"report-offline-{name}.png"), full_page=True)
        assert not [url for url in asked if "plot" in url], f"the page asked the network for plotly: {asked}"
    finally:
        context.close()
