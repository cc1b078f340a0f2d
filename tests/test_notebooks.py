"""Notebooks executed by papermill, as `make report` does, and their recorded results checked."""

from __future__ import annotations

import importlib.util
import json
import re
import time

import pytest

import workbench as wb
from conftest import (
    HAVE_DEEPSPEED,
    HAVE_VLLM,
    NOTEBOOK_SECONDS,
    NOTEBOOKS,
    assert_client_matches_server,
    llama_server_or_skip,
)
from workbench.report import read_results, run_notebook


def test_quickstart_report(quickstart_report):
    results = read_results(quickstart_report / "00_quickstart.ipynb")
    assert "Paris" in results["answer"]
    assert results["streamed"] == results["answer"]
    assert results["parameters"] == 134_515_008
    assert 0 < results["generated_tokens"] <= 16
    assert results["steps"] > 6
    if results["engine"] != "transformers":  # a paged cache: the shared system prompt shows as shared blocks
        assert results["busiest_blocks_used"] > 0 and results["shared_blocks"] > 0
    page = (quickstart_report / "00_quickstart.html").read_text()
    assert "The capital of France is Paris." in page
    assert page.count('class="plotly-graph-div"') == results["static_figures"]
    assert len(page) < 12_000_000  # plotly.js once (4.6 MB), no widget bundles


def test_paged_attention_notebook(notebook_report):
    executed, page = notebook_report("02_paged_attention")
    results = read_results(executed)
    assert results["shared_blocks"] > 0 and results["cached_tokens"] >= results["block_size"]
    assert results["preemptions"] > 0 and results["preemptions"] == results["vllm_num_preemptions"]
    reasons = results["idle_reasons"]  # why requests waited, by kind, over requests x steps
    assert reasons["preempted"] > 0 and reasons["no free KV blocks"] > 0, reasons
    assert set(reasons) <= {"preempted", "no free KV blocks", "queued behind the first in line", "batch full",
                            "token budget spent", "token budget", "unknown"}, reasons
    assert results["waste_paged_pct"] < results["waste_contiguous_pct"]
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def test_continuous_batching_notebook(notebook_report):
    executed, page = notebook_report("03_continuous_batching")
    results = read_results(executed)
    assert set(results["engines"]) >= {"transformers", "transformers-paged"}
    for name, ttft in results["ttft_continuous_s"].items():
        assert ttft < results["ttft_static_s"], f"{name}: continuous batching's mean TTFT is not below static's"
    assert results["max_running"]["transformers-paged"] > 1  # requests really ran together
    limits = results["ttft_by_batch_limit"]
    assert limits["2"] > limits["8"]  # a tight cap keeps arrivals waiting
    assert results["side_by_side"] == ["transformers", "transformers-paged"]
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]
    if HAVE_VLLM:  # chunked prefill, from vLLM's own scheduler output at every step
        on, off = results["chunked_prefill"]["on"], results["chunked_prefill"]["off"]
        assert on["prefill_steps"] > 1 and sum(on["chunks"]) == on["prompt_tokens"] > results["chunk_tokens"]
        assert max(on["chunks"]) <= results["chunk_tokens"] - len(on["decoders"])  # the decoders were served first
        assert on["decoders"] and on["decoders_got_a_token_every_prefill_step"]
        assert off["prefill_steps"] == 1 and off["chunks"] == [off["prompt_tokens"]]  # the whole prompt in one step
        assert off["decoders"] and off["decoders_got_a_token_every_prefill_step"]  # it rode along, and waited


def test_engines_tour_notebook(notebook_report):
    executed, _ = notebook_report("01_engines_tour")
    results = read_results(executed)
    assert results["survey_engines"] == ["Transformers", "vLLM", "TGI", "TensorRT-LLM", "DeepSpeed"]
    installed = {s.name for s in wb.engines() if s.installed and not s.remote}
    assert set(results["available"]) == installed
    for name, answer in results["answers"].items():
        assert "Paris" in answer, f"{name} answered {answer!r}"
    assert results["greedy_tokens_agree"]  # same weights, same precision, greedy: same tokens in every engine
    for name, missing in results["unavailable"].items():
        assert missing["why"] and missing["how"], f"{name} does not say why it is missing or how to get it"
    assert {"tgi", "tensorrt-llm"} <= set(results["unavailable"])
    techniques = results["techniques"]  # each technique links to a notebook that exists, or says none shows it yet
    assert all((NOTEBOOKS / notebook).exists() for notebook in techniques.values() if notebook), techniques
    assert techniques["chunked prefill"] == "03_continuous_batching.ipynb"
    assert techniques["ZeRO and offload"] == "04_memory.ipynb"
    assert techniques["speculative decoding"] == "11_speculative_decoding.ipynb"
    assert techniques["kernel injection, compiled graphs and kernel fusion"] == "10_compilation.ipynb"
    assert techniques["precision and quantization (FP16/BF16, INT8, 4-bit; GPTQ, AWQ)"] == \
        "09_precision_and_quantization.ipynb"


def test_memory_notebook(notebook_report):
    executed, page = notebook_report("04_memory")
    results = read_results(executed)
    rows, per_token = results["rows"], results["kv_bytes_per_token_config"]
    assert per_token == {"float32": 2 * 30 * 3 * 64 * 4, "bfloat16": 2 * 30 * 3 * 64 * 2}  # SmolLM2's config
    assert {"transformers float32", "transformers bfloat16", "transformers-paged float32"} <= set(rows)
    for name, row in rows.items():  # every engine's real cache tensors hold exactly the config's bytes per token
        assert row["kv_bytes_per_token_measured"] == row["kv_bytes_per_token"] == per_token[name.split()[-1]], name
        assert row["weights_bytes"] > 0 and row["kv_cache_bytes"] > 0
    assert rows["transformers bfloat16"]["weights_bytes"] * 2 == rows["transformers float32"]["weights_bytes"]
    assert rows["transformers-paged float32"]["kv_cache_bytes"] > 100 * rows["transformers float32"]["kv_cache_bytes"]
    for name, error in results["errors"].items():
        assert error and "float32" in error, f"{name}: {error!r}"
    for fits in results["fits"].values():
        contiguous = next(v for k, v in fits.items() if k.startswith("contiguous"))
        assert contiguous < fits["paged, block 16"] <= fits["exact length"]
    if "vllm float32" in rows:
        check = results["vllm_check"]  # vLLM's own admission sum agrees with the workbench's
        assert check["workbench_requests_that_fit"] == int(check["vllm_max_concurrency"])
    offload = results["offload"]  # a weights budget smaller than the weights: measured, not configured
    whole = offload["none"]
    budgets = {name: row for name, row in offload.items() if name.endswith(" MiB")}
    assert len(budgets) == 2
    for name, row in budgets.items():
        assert row["placement"].get("disk", 0) > 0 and row["offloaded_bytes"] > 0, name
        assert row["weights_bytes"] - row["offloaded_bytes"] < row["weights_resident_peak_bytes"], name
        assert row["weights_resident_peak_bytes"] <= row["budget_bytes"] < row["weights_bytes"], name
        assert row["peak_bytes"] < whole["peak_bytes"], name  # the process's peak, below the unoffloaded run's
        assert whole["answer"].startswith(row["answer"]), name  # greedy: the same tokens, fewer of them
    if HAVE_DEEPSPEED:  # ZeRO-3 on a CPU: every partition stays in memory, plus the module gathered for its pass
        zero = offload["DeepSpeed ZeRO-3, cpu"]
        assert whole["answer"].startswith(zero["answer"])
        assert zero["weights_bytes"] == whole["weights_bytes"] == zero["offloaded_bytes"]
        assert zero["weights_bytes"] < zero["weights_resident_peak_bytes"] <= zero["weights_bytes"] + 49152 * 576 * 4
        nvme = "DeepSpeed ZeRO-3, nvme"  # runs where DeepSpeed's async_io op builds (libaio), is refused elsewhere
        assert nvme in offload or "libaio" in results["offload_errors"][nvme]
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def test_engine_report_notebook(notebook_report):
    executed, page = notebook_report("05_engine_report")
    results = read_results(executed)
    installed = [s.name for s in wb.engines() if s.installed and not s.remote]
    assert results["engines"] == installed  # a row per engine installed here
    for name, row in results["table"].items():
        for column in ("tokens/s", "TTFT p50 s", "TTFT p95 s", "TPOT s", "peak memory GiB", "load s", "peak tokens/s"):
            assert row[column] > 0, f"{name}: {column} = {row[column]}"
        assert row["TTFT p95 s"] >= row["TTFT p50 s"]
        assert 0 <= row["KV waste %"] < 100
    assert {"performance (survey)", "ease of use", "distributed support", "hardware dependency",
            "typical use"} <= set(results["survey_columns"])
    claims = {c["claim"]: c for c in results["claims"]}
    speed = claims["vLLM is 14 to 24 times faster than Transformers"]
    if {"vllm", "transformers"} <= set(installed):
        table = results["table"]
        # at saturation: each engine's peak throughput from its sweep
        assert speed["measured here"] == table["vllm"]["peak tokens/s"] / table["transformers"]["peak tokens/s"]
    assert claims["vLLM is 2.2 to 2.5 times faster than TGI"]["verdict"].startswith("not measured here")
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


@pytest.mark.skipif(not HAVE_VLLM, reason="the notebook starts vLLM's OpenAI server")
def test_serving_dashboard_notebook(notebook_report):
    executed, page = notebook_report("06_serving_dashboard")
    results = read_results(executed)
    assert results["server_kind"] == "vllm"
    assert results["answered"] == results["requests"]
    assert results["output_tokens"] == [48] * results["requests"]  # the server's usage counts
    assert results["max_server_running"] > 1  # the server's /metrics saw requests batched together
    assert results["max_client_decoding"] > 1  # and the client saw answers stream in together
    assert results["server_generation_tokens"] == sum(results["output_tokens"])
    assert results["tokens_per_s"] > 0
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def run_dashboard(label: str, parameters: dict, out_dir) -> tuple[dict, object]:
    """Notebook 06 with these parameters: its recorded results and its HTML page, its time noted under `label`."""
    start = time.perf_counter()
    executed, page = run_notebook(NOTEBOOKS / "06_serving_dashboard.ipynb", parameters, out_dir=out_dir,
                                  progress_bar=False)
    NOTEBOOK_SECONDS[f"06_serving_dashboard ({label})"] = time.perf_counter() - start
    return read_results(executed), page


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")),
                    reason="transformers serve needs fastapi and uvicorn")
def test_serving_dashboard_notebook_on_transformers_serve(tmp_path):
    results, page = run_dashboard("transformers serve", {"start_server": "transformers", "requests": 4,
                                                         "output_tokens": 24}, tmp_path)
    assert results["server_kind"] == "unknown" and results["max_server_running"] is None  # it has no /metrics
    assert results["answered"] == results["requests"] == 4
    assert all(0 < n <= 24 for n in results["output_tokens"])  # no ignore_eos here: answers may end early
    assert results["max_client_decoding"] == 1  # it answers one request at a time; vLLM's server does not
    assert results["polls"] > 3
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"] == 2


@pytest.mark.llama_server
def test_serving_dashboard_notebook_on_llamacpp_server(tmp_path):
    llama_server_or_skip()
    results, page = run_dashboard("llama.cpp", {"start_server": "llama.cpp", "requests": 8, "output_tokens": 32},
                                  tmp_path)
    assert results["server_kind"] == "llamacpp"
    assert results["answered"] == results["requests"] == 8
    assert results["output_tokens"] == [32] * 8  # it takes ignore_eos, so the notebook asks for exact lengths
    assert 1 < results["max_server_running"] <= 4  # its 4 slots decoded requests together, as its /metrics said
    assert results["max_kv_usage"] is None  # this llama.cpp publishes no KV usage
    assert results["server_generation_tokens"] == 8 * 32
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"] == 3


def test_load_sweep_notebook(notebook_report):
    executed, page = notebook_report("07_load_sweep")
    results = read_results(executed)
    installed = {s.name for s in wb.engines() if s.installed and not s.remote}
    expected = [n for n in ("vllm", "transformers-paged") if n in installed] + (["vllm server"] if HAVE_VLLM else [])
    assert results["engines"] == expected
    for name, points in results["points"].items():
        assert [p["offered"] for p in points] == [1, 2, 4, 8][: len(points)] and len(points) >= 3, name
        for p in points:
            for metric in ("ttft", "tpot", "itl", "e2el"):
                assert p[f"p99_{metric}_ms"] >= p[f"p95_{metric}_ms"] >= p[f"median_{metric}_ms"] > 0, (name, p)
            assert p["request_goodput"] <= p["request_throughput"]
            assert p["completed"] == 8 and p["failed"] == 0
        knee = results["knee"][name]
        rising = [p["output_throughput"] for p in points[: knee + 1]]
        assert rising == sorted(rising) and rising[-1] > 1.5 * rising[0], name  # throughput rises to the knee
        heaviest = points[-1]  # at the highest load the engine's state shows why latency climbed
        assert heaviest["waiting_max"] > 0 or heaviest["kv_usage_peak"] > 0.9 or heaviest["preemptions"], name
        assert heaviest["running_max"] <= 4  # the batch cap held
    if "vllm server" in results["points"]:
        for p in results["points"]["vllm server"]:
            assert_client_matches_server(p, at=p["load"])
    folder = executed.parent
    for name in results["files"]:
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "07_load_sweep.json").read_text())
    assert len(saved["points"]) == sum(len(p) for p in results["points"].values())
    html = page.read_text()
    assert html.count('class="plotly-graph-div"') == results["static_figures"]
    # the engines' log lines went to the log file the report links to, not into the report
    import nbformat

    printed = "".join(output.get("text", "") for cell in nbformat.read(str(executed), as_version=4).cells
                      for output in cell.get("outputs", []) if output.get("output_type") == "stream")
    assert not re.search(r"\b(INFO|WARNING|DEBUG)\b", printed), printed
    assert 'href="07_load_sweep.log"' in html and "vllm" in (folder / "07_load_sweep.log").read_text()


def test_parallelism_notebook(notebook_report):
    executed, page = notebook_report("08_parallelism")
    results = read_results(executed)
    layouts = results["layouts"]
    if HAVE_VLLM:  # vLLM's own check, before it loads anything: SmolLM2's 9 heads do not split in two
        [refusal] = results["refusals"].values()
        assert "attention heads (9) must be divisible by tensor parallel size (2)" in refusal
        assert {"vLLM, tensor parallel 2", "vLLM, pipeline parallel 2"} <= set(layouts)
    assert importlib.util.find_spec("deepspeed") is None or "DeepSpeed AutoTP 2" in layouts
    for name, layout in layouts.items():
        assert layout["same_tokens_as_one_rank"], name
        ranks, options = layout["ranks"], layout["options"]
        split = options.get("tensor_parallel_size") or options.get("pipeline_parallel_size")
        if not split:
            assert len(ranks) == 1 and ranks[0]["collectives"] == {}
            continue
        assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks), name
        for rank in ranks:  # each forward pass made exactly the calls the layout needs, from the model's config
            expected = {k: v for k, v in layout["expected_calls_per_pass"].items() if k in rank["collectives_per_pass"]}
            assert rank["collectives_per_pass"] == expected and expected, (name, rank["collectives_per_pass"])
        whole = layout["whole_weight_bytes"]
        if options.get("tensor_parallel_size"):  # every projection of a layer split in two
            for rank in ranks:
                for projection, (inputs, outputs) in rank["projections"].items():
                    one_rank = layout["whole_projections"][projection]
                    assert 2 * inputs * outputs == one_rank[0] * one_rank[1], (name, projection)
            if layout["engine"] == "vllm":  # the vocabulary is split too: half the weights each
                assert all(abs(r["weight_bytes"] - whole / 2) < 0.01 * whole for r in ranks), name
        else:  # two stages: the layers split in half, each stage a half plus the embedding or the tied head
            assert [tuple(r["layers"]) for r in ranks] == [(0, 15), (15, 30)]
            assert set(ranks[0]["collectives_per_pass"]) == {"pp isend_tensor_dict"}
            embedding = 49152 * 576 * 4  # SmolLM2's vocabulary x hidden, float32
            assert all(abs(r["weight_bytes"] - (whole - embedding) / 2 - embedding) < 0.01 * whole for r in ranks)
        facts = {r["rank"]: r for r in ranks}
        memory = layout["memory_per_rank"]  # the run's trace, each rank's memory read from its own process
        assert [m["rank"] for m in memory] == [0, 1], name
        for m in memory:
            assert m["weights_bytes"] == facts[m["rank"]]["weight_bytes"], name
            assert m["process_peak_bytes"] > m["weights_bytes"] + m["kv_used_peak_bytes"] > m["weights_bytes"], name
            assert m["kv_used_peak_bytes"] <= m["kv_reserved_bytes"], name
            if layout["engine"] == "vllm":  # the trace's figure is the worker's cache tensors
                assert m["kv_reserved_bytes"] == facts[m["rank"]]["kv_cache_bytes"], name
            # half the KV heads (tensor parallel) or half the layers (pipeline): half of one rank's bytes per token
            assert 2 * m["kv_bytes_per_token"] == m["one_rank_kv_bytes_per_token"], name
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def test_precision_and_quantization_notebook(notebook_report):
    from transformers import AutoConfig

    executed, page = notebook_report("09_precision_and_quantization")
    results = read_results(executed)
    runs = results["runs"]
    fp32, bf16, int8, nf4 = (runs[f"transformers {v}"] for v in ("float32", "bfloat16", "int8", "nf4"))
    assert fp32["weight_bytes"] > bf16["weight_bytes"] > int8["weight_bytes"] > nf4["weight_bytes"]
    assert fp32["weight_bytes"] == 2 * bf16["weight_bytes"] == 4 * fp32["parameters"]
    c = AutoConfig.from_pretrained(wb.resolve_model("smollm2-135m").path)
    q_o, k_v = c.hidden_size * c.num_attention_heads * c.head_dim, c.hidden_size * c.num_key_value_heads * c.head_dim
    linear = c.num_hidden_layers * (2 * q_o + 2 * k_v + 3 * c.hidden_size * c.intermediate_size)
    for run, bits in ((int8, 8), (nf4, 4)):
        assert run["parameters"] == fp32["parameters"] and run["quantized_parameters"] == linear  # every projection
        assert 0.9 * bits <= 8 * run["quantized_bytes"] / run["quantized_parameters"] <= 1.1 * bits, run
        # what the library leaves (the tied embedding, the norms) stays in float32, to the byte
        assert run["weight_bytes"] - run["quantized_bytes"] == 4 * (fp32["parameters"] - linear)
        assert run["kv_bytes_per_token"] == fp32["kv_bytes_per_token"]  # weight-only: the cache is untouched
    assert fp32["kv_bytes_per_token"] == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    assert bf16["kv_bytes_per_token"] == fp32["kv_bytes_per_token"] / 2
    assert fp32["top1_agreement"] == fp32["greedy_agreement"] == 1.0
    assert len(fp32["tokens"]) == results["greedy_tokens"] and results["passage_tokens"] > 200
    for name, run in runs.items():
        assert "Paris" in run["answer"], (name, run["answer"])
        assert run["perplexity"] > 1 and run["tokens_per_s"] > 0 and 0 <= run["top1_agreement"] <= 1, name
    assert bf16["top1_agreement"] > 0.9 and int8["top1_agreement"] > 0.9  # their losses are small ones
    if HAVE_VLLM:  # the same float32 weights in another engine: vLLM's own prompt logprobs agree with transformers'
        vllm = runs["vllm float32"]
        assert vllm["weight_bytes"] == fp32["weight_bytes"] and vllm["kv_bytes_per_token"] == fp32["kv_bytes_per_token"]
        assert abs(vllm["perplexity"] / fp32["perplexity"] - 1) < 0.005 and vllm["top1_agreement"] > 0.95
        if "bfloat16" in results["vllm_refused"]:
            assert "dtype='float32'" in results["vllm_refused"]["bfloat16"]
        else:
            assert runs["vllm bfloat16"]["weight_bytes"] == bf16["weight_bytes"]
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def test_compilation_notebook(notebook_report):
    executed, page = notebook_report("10_compilation")
    results = read_results(executed)
    runs = results["runs"]
    engines = ["transformers", "vllm"] if HAVE_VLLM else ["transformers"]
    for engine in engines:
        ran = [run for run in runs.values() if run["engine"] == engine]  # (the record's keys come back sorted)
        eager, compiled = sorted(ran, key=lambda run: run["mode"] != "eager")
        assert compiled["tokens"] == eager["tokens"] and len(eager["tokens"]) == results["max_tokens"], engine
        assert eager["mode"] == "eager" and eager["graphs"] == eager["kernels"] == 0, engine
        assert compiled["graphs"] >= 1 and compiled["graph_breaks"] == 0, (engine, compiled)
        # inductor's own counts: it generated kernels, fewer than the operations it started from (it fused some),
        # unless its cache supplied every graph
        assert compiled["nodes_before_fusion"] > compiled["kernels"] > 0 or compiled["cache_hits"] > 0, compiled
    transformers = next(run for run in runs.values() if run["engine"] == "transformers" and run["mode"] != "eager")
    assert transformers["compile_seconds"] > 0 and transformers["mode"].startswith("torch.compile")
    if HAVE_DEEPSPEED:
        assert "need a CUDA GPU" in results["not_here"]["deepspeed kernel_inject=True"]
    assert "NVIDIA" in results["not_here"]["tensorrt-llm"]
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]


def test_speculative_decoding_notebook(notebook_report):
    executed, page = notebook_report("11_speculative_decoding")
    results = read_results(executed)
    runs = results["runs"]
    assert results["engines"] == (["transformers", "vllm"] if HAVE_VLLM else ["transformers"])
    for engine in results["engines"]:
        rates = {}
        for prompt in ("repeats its input", "new text"):
            plain, fast = runs[f"{engine} / plain / {prompt}"], runs[f"{engine} / speculative / {prompt}"]
            assert fast["tokens"] == plain["tokens"] and len(plain["tokens"]) == results["max_tokens"], (engine, prompt)
            assert plain["draft_tokens"] == 0 and fast["draft_tokens"] > 0, (engine, prompt)
            steps = fast["per_step"]  # [drafted, accepted, tokens gained] at each step the request ran
            assert all(0 <= a <= d <= results["draft_tokens"] for d, a, _ in steps), (engine, prompt)
            # every step yields its accepted drafts plus the model's own next token (the last may be cut at max_tokens)
            assert all(gained == a + 1 for _, a, gained in steps[:-1]) and steps[-1][2] <= steps[-1][1] + 1
            assert sum(gained for *_, gained in steps) == results["max_tokens"]
            assert fast["steps"] < plain["steps"] or prompt == "new text"
            if engine == "vllm":  # the trace's counts are vLLM's own spec-decode counters over the run
                counters = fast["engine_counters"]
                assert counters["vllm:spec_decode_num_draft_tokens"] == fast["draft_tokens"], counters
                assert counters["vllm:spec_decode_num_accepted_tokens"] == fast["accepted_tokens"], counters
                assert counters["vllm:spec_decode_num_drafts"] == fast["drafts"], counters
            rates[prompt] = fast["acceptance_rate"]
        assert rates["repeats its input"] > 0 and rates["repeats its input"] > rates["new text"], (engine, rates)
    assert page.read_text().count('class="plotly-graph-div"') == results["static_figures"]
