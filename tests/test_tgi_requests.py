"""What the `tgi` engine sends, checked against TGI's router source (no TGI server runs here: it is a Rust binary
shipped in Docker images). These test the request the workbench builds, not TGI."""

from __future__ import annotations

import pytest

import workbench as wb
from workbench.engines.tgi import TGIEngine
from workbench.types import SamplingOptions


@pytest.fixture
def tgi() -> TGIEngine:
    engine = TGIEngine(model="HuggingFaceTB/SmolLM2-135M-Instruct", url="http://127.0.0.1:8080")  # no network yet
    engine.tgi_info = {"model_id": engine.model.name, "max_stop_sequences": 4}  # what its /info would say
    return engine


def test_chat_requests_leave_out_what_tgis_validation_refuses(tgi):
    greedy = tgi._request_options(SamplingOptions(16, temperature=0))
    assert greedy["model"] == "tgi"  # any other name is read as a LoRA adapter id
    assert "top_p" not in greedy  # validation.rs: top_p must be in (0, 1); 1.0 is refused
    sampled = tgi._request_options(SamplingOptions(16, temperature=0.7, top_p=0.9))
    assert sampled["top_p"] == 0.9 and sampled["temperature"] == 0.7
    assert "top_p" not in tgi._request_options(SamplingOptions(16, temperature=0.7))


def test_options_tgi_cannot_honour_are_refused_before_sending(tgi):
    with pytest.raises(wb.InvalidRequestError, match="top_k"):  # the Messages API has no top_k
        tgi._check_options(SamplingOptions(16, temperature=0.7, top_k=5), chat=True)
    tgi._check_options(SamplingOptions(16, temperature=0.7, top_k=5), chat=False)  # /generate_stream takes it
    with pytest.raises(wb.InvalidRequestError, match="at most 4 stop strings"):
        tgi._check_options(SamplingOptions(16, stop=["a", "b", "c", "d", "e"]), chat=False)
    with pytest.raises(wb.InvalidRequestError, match="end-of-sequence"):
        tgi._check_options(SamplingOptions(16, ignore_eos=True), chat=True)
