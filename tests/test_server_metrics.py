"""A server's /metrics read into trace steps, on a reading saved from vLLM's OpenAI server (tests/data)."""

from __future__ import annotations

from pathlib import Path

from workbench.engines.server_metrics import parse_metrics

SAVED = (Path(__file__).resolve().parent / "data" / "vllm_metrics.txt").read_text()


def test_a_vllm_reading_gives_its_gauges_counters_histograms_and_cache_layout():
    sample = parse_metrics(SAVED)
    assert sample.kind == "vllm"
    assert sample.block_size > 0 and sample.num_blocks > 0  # from vllm:cache_config_info's labels
    assert sample.values["generation_tokens"] > 0 and sample.values["ttft_count"] > 0
    assert sample.values["ttft_sum"] > 0 and sample.values["e2el_count"] == sample.values["ttft_count"]
    assert 0 <= sample.kv_usage <= 1 and sample.rss_bytes > 0
    counters = sample.counters()
    assert {"server_running", "server_waiting", "kv_usage", "generation_tokens"} <= set(counters)
    assert "ttft_sum" not in counters  # a step shows gauges and token counts, not histograms


def test_other_servers_names():
    tgi = parse_metrics("tgi_batch_current_size 3\ntgi_queue_size 2\ntgi_request_generated_tokens_sum 40\n")
    assert tgi.kind == "tgi" and (tgi.running, tgi.waiting, tgi.generation_tokens) == (3, 2, 40)
    llama = parse_metrics("llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n"
                          "llamacpp:tokens_predicted_total 64\n")
    assert llama.kind == "llamacpp" and (llama.running, llama.waiting, llama.generation_tokens) == (2, 1, 64)
    assert parse_metrics("something_else 1\n").kind == "unknown"
