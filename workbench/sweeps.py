"""Load sweeps: one workload served at rising load, one row per load point with vLLM bench's serving metrics beside
the engine's own state at that load (queue, batch, KV cache, preemptions), and the point's trace.

>>> import workbench as wb
>>> from workbench.workload import make_workload
>>> points = wb.sweep(engine, make_workload(n=32), concurrencies=[1, 4, 16], slos={"ttft": 500})  # doctest: +SKIP
>>> points[["load", "output_throughput", "p99_ttft_ms", "waiting_max", "kv_usage_peak"]]          # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from workbench.analysis import check_slos, engine_state, serving_metrics
from workbench.errors import InvalidRequestError
from workbench.workload import Request, as_requests, check_rate, with_arrivals

if TYPE_CHECKING:
    import pandas as pd

    from workbench.engines.interface import Engine

#: a point saturates when its throughput gains less than this over the best before it ...
SATURATION_GAIN = 1.05
#: ... while its latency (from scheduled arrival to the last token) grows by more than this over the point before
LATENCY_CLIMB = 1.25


def sweep(engine: Engine, workload: Sequence[Request | str], rates: Sequence[float] | str | None = None,
          concurrencies: Sequence[int] | None = None, slos: dict | None = None, burstiness: float = 1.0,
          seed: int = 0, points: int = 4, stop_at_saturation: bool = True, progress: bool = True) -> pd.DataFrame:
    """Serve `workload` once per load point, from the lightest load up, and return a DataFrame with a row per point.

    Load points are request rates (`rates`: requests per second, arrivals with gamma gaps of shape `burstiness`,
    `inf` for all at once) or closed-loop concurrencies (`concurrencies`: at most N requests in flight). With
    `rates="auto"`, the sweep first serves the workload one request at a time ("synchronous") and all at once
    ("throughput"), then at `points` rates evenly spaced between the two request rates, as GuideLLM's sweep does.

    Each row: `load`, `mode` ("rate" or "concurrency"), `offered` (the rate or concurrency), the serving metrics of
    `workbench.analysis.serving_metrics` (with `request_goodput` under `slos`), the engine state of
    `workbench.analysis.engine_state`, and `trace`. With `stop_at_saturation`, the sweep stops after a point whose
    throughput stopped rising while its latency climbed (more load would only queue); `engine.stop()` or an
    interrupt stops it too. Either way the points done are returned, and `df.attrs["stopped"]` says why.
    """
    from tqdm.auto import tqdm

    check_slos(slos)
    requests = as_requests(workload)
    if not requests:
        raise InvalidRequestError("the workload is empty: give at least one request.")
    plan = _plan(rates, concurrencies, burstiness)
    rows: list[dict] = []
    stopped = ""
    bar = tqdm(total=points + 2 if plan[0][0] == "auto" else len(plan), desc="load points", disable=not progress)
    throughput = None  # in an automatic sweep, the all-at-once point: measured first, shown last
    try:
        if plan[0][0] == "auto":
            for mode, value in (("concurrency", 1), ("rate", math.inf)):
                if not _serve_point(engine, requests, mode, value, burstiness, seed, slos, rows, bar):
                    return _frame(rows, "stopped")
            throughput = rows.pop()
            low, high = rows[0]["request_throughput"], throughput["request_throughput"]
            plan = [("rate", low + (high - low) * k / (points + 1)) for k in range(1, points + 1)]
        for mode, value in plan:
            if not _serve_point(engine, requests, mode, value, burstiness, seed, slos, rows, bar):
                stopped = "stopped"
                break
            if stop_at_saturation and len(rows) > 1 and _saturated(rows):
                stopped = f"saturated at {rows[-1]['load']}: throughput stopped rising while latency climbed"
                break
        if throughput is not None:
            rows.append(throughput)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
    return _frame(rows, stopped)


def _plan(rates, concurrencies, burstiness: float) -> list[tuple[str, float]]:
    """The load points, lightest first, with every bad value refused in one line."""
    if (rates is None) == (concurrencies is None):
        raise InvalidRequestError("give either rates=[...] (requests per second, or 'auto') or concurrencies=[...] "
                                  "(requests in flight), not both and not neither.")
    if rates == "auto":
        check_rate(1.0, burstiness)
        return [("auto", 0.0)]
    if isinstance(rates, str):
        raise InvalidRequestError(f"rates must be a list of requests per second or 'auto', got {rates!r}.")
    values = list(rates if rates is not None else concurrencies)
    name = "rate" if rates is not None else "concurrency"
    if not values:
        hint = " (or rates='auto')" if rates is not None else ""
        raise InvalidRequestError(f"the {name} list is empty: give at least one {name}{hint}.")
    for value in values:
        if rates is not None:
            check_rate(value, burstiness)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"each concurrency must be an integer of at least 1 (requests in flight), got "
                                      f"{value!r}.")
    return [(name, value) for value in sorted(set(values))]


def _serve_point(engine: Engine, requests: list[Request], mode: str, value: float, burstiness: float, seed: int,
                 slos: dict | None, rows: list[dict], bar) -> bool:
    """Serve one load point and add its row; False when the engine was stopped meanwhile (the point is dropped)."""
    if mode == "rate":
        trace = engine.run(requests, rate=value, burstiness=burstiness, seed=seed)
        label = "throughput" if value == math.inf else f"rate {value:.3g}/s"
    else:
        trace = engine.run(with_arrivals(requests, [0.0] * len(requests)), max_concurrency=int(value))
        label = "synchronous" if value == 1 else f"concurrency {int(value)}"
    if engine.stopping:
        return False
    row = {"load": label, "mode": mode, "offered": float(value), **serving_metrics(trace, slos),
           **engine_state(trace), "trace": trace}
    rows.append(row)
    bar.update(1)
    bar.set_postfix_str(f"{label}: {row['output_throughput']:.1f} tokens/s")
    return True


def _latency(row: dict) -> float:
    """Mean latency from a request's scheduled arrival to its last token (ms)."""
    return row["mean_e2el_ms"] + row["mean_client_queue_time_ms"]


def _saturated(rows: list[dict]) -> bool:
    """Whether the newest point's throughput stopped rising while its latency climbed."""
    best = max(row["output_throughput"] for row in rows[:-1])
    return (rows[-1]["output_throughput"] < SATURATION_GAIN * best
            and _latency(rows[-1]) > LATENCY_CLIMB * _latency(rows[-2]))


def _frame(rows: list[dict], stopped: str) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.attrs["stopped"] = stopped
    return frame


def saturation_point(points: pd.DataFrame) -> int | None:
    """The row of the sweep's knee: the lightest load whose output throughput reached 95% of the sweep's peak."""
    if points.empty:
        return None
    peak = points["output_throughput"].max()
    return int(points.index[points["output_throughput"] >= 0.95 * peak][0])


def save_sweep(points: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Write a sweep's rows (without their traces) as `stem.json` (a list of rows, vLLM bench's keys) and
    `stem.csv`; returns both paths."""
    table = points.drop(columns=["trace"], errors="ignore")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    records = json.loads(table.to_json(orient="records"))  # NaN and inf become null, as JSON has neither
    json_path.write_text(json.dumps({"stopped": points.attrs.get("stopped", ""), "points": records}, indent=1))
    table.to_csv(csv_path, index=False)
    return json_path, csv_path
