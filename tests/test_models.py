"""Model resolution: the bundled model, tiny random models, folders, hub ids offline, and the atomic build."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

import workbench as wb
from workbench import models


def test_bundled_model_is_a_plain_hf_folder():
    resolved = wb.resolve_model("smollm2-135m")
    assert resolved.source == "bundled"
    config = json.loads((resolved.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] == 3 and config["hidden_size"] == 576
    assert "quantization_config" not in config  # vLLM refuses a folder still marked as GGUF-quantized
    assert list(resolved.path.glob("*.safetensors"))
    assert (resolved.path / "tokenizer.json").exists()
    assert models.count_parameters(resolved.path) == 134_515_008


def test_tiny_models_have_different_architectures():
    llama = json.loads((wb.resolve_model("tiny-llama").path / "config.json").read_text())
    qwen = json.loads((wb.resolve_model("tiny-qwen2").path / "config.json").read_text())
    assert (llama["model_type"], qwen["model_type"]) == ("llama", "qwen2")


def test_local_folder_is_used_as_is(tmp_path):
    bundled = wb.resolve_model("tiny-llama").path
    resolved = wb.resolve_model(str(bundled))
    assert resolved.source == "folder" and resolved.path == bundled
    with pytest.raises(wb.ModelNotFoundError, match="has no config.json"):
        wb.resolve_model(str(tmp_path))


def test_hub_id_offline_names_the_bundled_alias(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(wb.ModelNotFoundError, match="use the bundled 'smollm2-135m'"):
        wb.resolve_model("some-org/some-model")


def test_unknown_name_lists_the_aliases():
    with pytest.raises(wb.ModelNotFoundError, match="not an alias \\(smollm2-135m, tiny-llama, tiny-qwen2\\)"):
        wb.resolve_model("smollm-135")


def _slow_build(out: Path) -> None:
    log = Path(out).parent.parent / "builds.log"
    with open(log, "a") as f:
        f.write("build\n")
    time.sleep(1.0)
    (out / "config.json").write_text("{}")


def _racer(cache: str) -> str:
    import os

    os.environ["WORKBENCH_CACHE"] = cache
    return str(models._build_once("racy", _slow_build))


def test_two_processes_building_at_once_build_once(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_racer, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    assert (tmp_path / "builds.log").read_text().count("build") == 1
    assert (Path(paths[0]) / "config.json").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == ["racy"]


def test_interrupted_build_leaves_nothing_usable(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))

    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._build_once("broken", crash)
    assert not (tmp_path / "models" / "broken").exists()
    assert [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    path = models._build_once("broken", lambda out: (out / "config.json").write_text("{}"))
    assert (path / "config.json").exists()


def test_a_built_model_has_the_modes_the_umask_gives(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    old = os.umask(0o022)  # a teaching server's cache, shared by several users
    try:
        path = models._build_once("shared", lambda out: (out / "config.json").write_text("{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755  # not the 0700 of the temporary folder it was built in
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in path.iterdir())
