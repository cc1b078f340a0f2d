"""The `workbench` command: `workbench report NOTEBOOK -p NAME VALUE ...`, `workbench engines`, `workbench models`."""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any


def _value(text: str) -> Any:
    """A parameter value as papermill's own CLI reads it: a Python literal when it is one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="execute a notebook into reports/ as .ipynb and .html")
    report.add_argument("notebook")
    report.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    report.add_argument("-o", "--out-dir", default="reports")
    commands.add_parser("engines", help="list the engines, installed or not")
    commands.add_parser("models", help="list the model aliases")
    args = parser.parse_args(argv)

    if args.command == "report":
        from workbench.report import run_notebook

        params = {name: _value(value) for name, value in args.parameter}
        executed, page = run_notebook(args.notebook, params, args.out_dir)
        print(f"executed notebook: {executed}\nHTML page: {page}")
    elif args.command == "engines":
        from workbench import engines

        for status in engines():
            state = "installed" if status.installed else f"not installed: {status.reason}; {status.install}"
            print(f"{status.name:20} {state}\n{'':20} {status.description}")
    else:
        from workbench.models import list_models

        for name, description in list_models().items():
            print(f"{name:14} {description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
