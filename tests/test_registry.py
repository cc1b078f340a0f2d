"""The registry of engines: the one place an engine's name is written, and clear errors for the others."""

from __future__ import annotations

import pytest

import workbench as wb
from workbench.engines import SPECS, adapter_class, engine_statuses


def test_every_engine_is_listed_with_its_state():
    statuses = {s.name: s for s in engine_statuses()}
    assert set(statuses) == set(SPECS)
    for status in statuses.values():
        assert status.installed or (status.reason and status.install), status
    assert {s.name for s in statuses.values() if s.remote} == {"openai", "tgi"}


def test_an_unknown_engine_lists_the_known_ones():
    with pytest.raises(wb.UnknownEngineError, match="unknown engine 'vlm'.*vllm"):
        wb.load("vlm")


def test_the_registry_names_each_adapter_and_its_module_follows_the_name():
    for name in ("openai", "tgi"):  # server clients: importable everywhere, no model to load
        cls = adapter_class(name)
        assert cls.name == name and cls.__module__ == SPECS[name].module


def test_a_server_engine_is_made_without_a_server_and_connects_on_first_use():
    from workbench.servers import free_port

    engine = adapter_class("openai")(url=f"http://127.0.0.1:{free_port()}/v1")  # no network in the constructor
    with pytest.raises(wb.WorkbenchError, match="cannot reach a server"):
        engine.info  # noqa: B018 - connecting happens here
