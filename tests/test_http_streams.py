"""The streaming client: a pooled connection the server closed while it sat idle is not a failed request."""

from __future__ import annotations

import asyncio

from workbench.engines.http_streams import Stamps, StreamClient, server_sent_events

ANSWER = b'data: {"n": 1}\n\ndata: [DONE]\n\n'


async def _server(connections: list[int]) -> asyncio.AbstractServer:
    """Answers the first request on each connection and keeps it open; a second request on one it closes unread,
    as a server does with a connection it dropped for idling just as the client sent on it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        served = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            if served:
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(ANSWER), ANSWER))
            await writer.drain()
            served += 1

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_request_on_a_connection_the_server_closed_is_sent_again_on_a_new_one():
    client = StreamClient(timeout_s=10)
    connections: list[int] = []
    server = client.call(_server(connections))
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"

    async def one() -> list[bytes]:
        stamps = Stamps()
        events = [data async for _, data in server_sent_events(client.http, url, {"prompt": "hi"}, {}, stamps)]
        assert stamps.sent is not None
        return events

    try:
        assert client.call(one()) == [b'{"n": 1}']
        assert client.call(one()) == [b'{"n": 1}']  # the pooled connection was dropped: sent again, answered
        assert len(connections) == 2
    finally:
        server.close()
        client.close()
