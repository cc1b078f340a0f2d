"""The workbench client's own ceiling: how many concurrent streams, and how many requests a second, it follows while
its timing error stays under 5%.

The server is `bench/synthetic_server.py`, which streams every answer on a fixed schedule and records when it
received each request and wrote each chunk (on the machine-wide monotonic clock). The client's mean time to first
token, inter-token latency and end-to-end latency are compared with the server's own; the difference is the
client's error (its stamping delay, and its share of the machine's two cores, which the server needs too).

    .venv/bin/python bench/client_ceiling.py
    .venv/bin/python bench/client_ceiling.py --concurrencies 1 64 256 --rates 50 200 --tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

import workbench as wb
from workbench.analysis import serving_metrics
from workbench.servers import free_port
from workbench.workload import Request

BOUND = 0.05


def start_server(ttft: float, itl: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("synthetic_server.py")), "--port",
                                str(port), "--ttft", str(ttft), "--itl", str(itl)])
    root = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{root}/v1/models", timeout=1)
            return process, root
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the synthetic server did not start")


def server_means(root: str) -> dict[str, float]:
    records = httpx.get(f"{root}/stats", timeout=10).json()
    gaps = [b - a for r in records for a, b in zip(r["writes"], r["writes"][1:])]
    return {"ttft": statistics.mean(r["writes"][0] - r["received"] for r in records),
            "itl": statistics.mean(gaps), "e2el": statistics.mean(r["writes"][-1] - r["received"] for r in records)}


def measure(engine, root: str, requests: list[Request], **load) -> dict:
    httpx.get(f"{root}/stats", timeout=10)  # clear the server's records
    trace = engine.run(requests, record=False, **load)
    client = serving_metrics(trace)
    server = server_means(root)
    row = {"requests/s": client["request_throughput"],
           "chunks/s": client["total_output_tokens"] / client["duration"]}
    for name in ("ttft", "itl", "e2el"):
        mine = client[f"mean_{name}_ms"] / 1000
        row[f"{name} client ms"] = 1000 * mine
        row[f"{name} server ms"] = 1000 * server[name]
        row[f"{name} error %"] = 100 * (mine / server[name] - 1)
    if "rate" in load:  # an open loop: how far behind its schedule the client sent
        row["behind schedule p99 ms"] = client["p99_client_queue_time_ms"]
    row["within 5%"] = all(abs(row[f"{n} error %"]) < 100 * BOUND for n in ("ttft", "itl", "e2el"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    parser.add_argument("--rates", type=float, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--tokens", type=int, default=32, help="chunks per answer, in the closed loop")
    parser.add_argument("--rate-tokens", type=int, default=4, help="chunks per answer at a rate (short answers: "
                        "the open loop measures requests per second)")
    parser.add_argument("--ttft", type=float, default=0.1, help="the server's time to first chunk (s)")
    parser.add_argument("--itl", type=float, default=0.02, help="the server's time between chunks (s)")
    args = parser.parse_args()
    import pandas as pd

    process, root = start_server(args.ttft, args.itl)
    try:
        with wb.load("openai", url=f"{root}/v1", model="synthetic", poll_s=1.0) as engine:
            engine.generate("warm up", max_tokens=2)
            closed = []
            for concurrency in args.concurrencies:
                requests = [Request("hi", max_tokens=args.tokens) for _ in range(max(16, 3 * concurrency))]
                closed.append({"concurrency": concurrency, **measure(engine, root, requests,
                                                                     max_concurrency=concurrency)})
            opened = []
            for rate in args.rates:
                requests = [Request("hi", max_tokens=args.rate_tokens) for _ in range(int(rate * 5))]
                opened.append({"rate": rate, **measure(engine, root, requests, rate=rate)})
    finally:
        process.kill()
    pd.set_option("display.width", 250)
    print(f"Synthetic server: first chunk after {args.ttft * 1000:.0f} ms, then one every {args.itl * 1000:.0f} ms; "
          f"client and server on this machine's cores together.\n")
    print(f"Closed loop (max_concurrency), {args.tokens} chunks an answer:")
    print(pd.DataFrame(closed).round(2).to_string(index=False))
    print(f"\nOpen loop (Poisson arrivals at a rate), {args.rate_tokens} chunks an answer:")
    print(pd.DataFrame(opened).round(2).to_string(index=False))
    streams = [r for r in closed if r["within 5%"]]
    rates = [r for r in opened if r["within 5%"]]
    best = max(streams, key=lambda r: r["concurrency"], default=None)
    print("\nCeiling, every mean within 5% of the server's: "
          + (f"{best['concurrency']} concurrent streams ({best['chunks/s']:.0f} chunks/s)" if best else "none")
          + ", " + (f"{max(r['requests/s'] for r in rates):.1f} requests/s" if rates else "no rate") + ".")


if __name__ == "__main__":
    main()
