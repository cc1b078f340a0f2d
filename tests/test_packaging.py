"""The project's own files: environment.yml agrees with pyproject.toml, the CLI and Makefile say what the README
says."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pip_lines_of_environment() -> list[str]:
    lines, inside = [], False
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        text = raw.split("#", 1)[0].rstrip()
        if text.strip() == "- pip:":
            inside = True
            continue
        if inside and text.strip().startswith("- "):
            lines.append(text.strip()[2:].strip())
    return lines


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = [*project["dependencies"], *project["optional-dependencies"]["vllm"],
                *project["optional-dependencies"]["deepspeed"], *project["optional-dependencies"]["dev"]]
    got = [line for line in _pip_lines_of_environment() if not line.startswith("-e")]
    assert sorted(got) == sorted(expected)
    assert "-e ." in _pip_lines_of_environment()


def test_torch_is_pinned_and_torchvision_is_not_asked_for():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    everything = " ".join([*project["dependencies"], *sum(project["optional-dependencies"].values(), [])])
    assert "torchvision" not in everything


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme and "make report" in readme
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_notebooks_are_committed_clean():
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, path.name
        assert nb.metadata["kernelspec"]["name"] and nb.metadata["language_info"]["name"] == "python"


def test_every_notebook_is_executed_and_checked_by_a_test():
    tests = (ROOT / "tests" / "test_notebooks.py").read_text() + (ROOT / "tests" / "conftest.py").read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f'"{path.stem}"' in tests or path.name in tests, f"no test executes {path.name}"
