"""A synthetic OpenAI-compatible streaming server for measuring a benchmark client, not an engine (GuideLLM ships a
mock server for the same purpose): it answers every chat request after `--ttft` seconds with one chunk, then one
chunk every `--itl` seconds, and records when it received each request and when it wrote each chunk.

Its clock is `time.perf_counter()`, which on Linux is CLOCK_MONOTONIC, the same clock in every process of the
machine: the client's stamps and the server's can be compared directly. `GET /stats` returns and clears the records.

    python bench/synthetic_server.py --port 8123 --ttft 0.1 --itl 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

RECORDS: list[dict] = []


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _event(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return _chunk(f"data: {text}\n\n".encode())


async def _answer(writer: asyncio.StreamWriter, body: dict, ttft: float, itl: float) -> None:
    received = time.perf_counter()
    tokens = int(body.get("max_tokens") or 16)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    await writer.drain()
    writes = []
    due = received + ttft
    for k in range(tokens):
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        choice = {"index": 0, "delta": {"content": f" t{k}"}, "finish_reason": "length" if k == tokens - 1 else None}
        writer.write(_event({"choices": [choice]}))
        await writer.drain()
        writes.append(time.perf_counter())
        due += itl
    writer.write(_event({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens}}))
    writer.write(_event("[DONE]") + _chunk(b""))
    await writer.drain()
    RECORDS.append({"received": received, "writes": writes})


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ttft: float, itl: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if method == "POST" and path.endswith("/chat/completions"):
                await _answer(writer, json.loads(body or b"{}"), ttft, itl)
                continue
            if path.endswith("/models"):
                payload = json.dumps({"data": [{"id": "synthetic", "max_model_len": 4096}]}).encode()
                status = b"200 OK"
            elif path == "/stats":
                payload = json.dumps(RECORDS).encode()
                RECORDS.clear()
                status = b"200 OK"
            else:
                payload, status = b'{"error": "not found"}', b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, ttft: float, itl: float) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, ttft, itl), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.1)
    parser.add_argument("--itl", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.ttft, args.itl))
