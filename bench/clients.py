"""Benchmark clients: many concurrent streams in one asyncio process, each timing every token it receives.

The upstream emits each token as `"<microseconds since the epoch at emission> "`, so a token's
delivery latency is its arrival time minus the number it carries. Every stream runs one reply
and reports its latencies, first-token delay, requests, bytes and completeness as JSON.

    python bench/clients.py --mode product --base http://127.0.0.1:8000 --streams 50 --out part.json
"""
import argparse
import asyncio
import json
import os
import resource
import socket
import time
from urllib.parse import urlsplit

MODES = ("sse", "memory", "shortpoll", "product")


def now_us():
    return time.time_ns() // 1000


class HttpError(Exception):
    """An answer with an unexpected status, or a broken connection."""


class Connection:
    """One keep-alive HTTP/1.1 connection with byte counters; reopens itself when the server closes it."""

    def __init__(self, base_url):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.reader = self.writer = None
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.cookie = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def send(self, method, path, body=None):
        """Writes one request; returns nothing (read the answer with read_head and read_body)."""
        if self.writer is None:
            await self.open()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        if self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        self.writer.write(data)
        self.requests += 1
        self.bytes_sent += len(data)

    async def read_head(self):
        """Returns (status, headers) of the next answer, headers keyed in lower case."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            self.close()
            raise HttpError(f"connection broke: {error!r}") from None
        self.bytes_received += len(head)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        cookie = headers.get("set-cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        return status, headers

    async def read_body(self, headers):
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                self.bytes_received += len(size_line) + 2
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.read()
        self.bytes_received += len(body)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return body

    async def request(self, method, path, body=None, expect=200):
        """Sends a request and returns its decoded JSON answer; raises HttpError on another status."""
        await self.send(method, path, body)
        status, headers = await self.read_head()
        data = await self.read_body(headers)
        if status != expect:
            raise HttpError(f"{method} {path.split('?')[0]} answered {status}: {data[:200]!r}")
        return json.loads(data) if data else None


class Tally:
    """Splits the received text into timestamp tokens and checks each arrives once, in order."""

    def __init__(self, expected):
        self.expected = expected
        self.partial = ""
        self.seen = set()
        self.last = 0
        self.latencies_ms = []
        self.duplicates = 0
        self.out_of_order = 0
        self.garbage = 0
        self.first_token_us = None

    def feed(self, text, received_us):
        parts = (self.partial + text).split(" ")
        self.partial = parts.pop()
        for part in parts:
            if not part.isdigit():
                self.garbage += 1
                continue
            stamp = int(part)
            if stamp in self.seen:
                self.duplicates += 1
                continue
            if stamp < self.last:
                self.out_of_order += 1
            self.seen.add(stamp)
            self.last = stamp
            self.latencies_ms.append((received_us - stamp) / 1000.0)
            if self.first_token_us is None:
                self.first_token_us = received_us

    def result(self):
        unique = len(self.seen)
        return {"tokens": unique, "lost": max(self.expected - unique, 0), "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "garbage": self.garbage + (1 if self.partial else 0),
                "extra": max(unique - self.expected, 0), "latencies_ms": self.latencies_ms}


def prompt(tokens, rate):
    return f"Count for the benchmark [[sim content=timestamps tokens={tokens} rate={rate:g}]]"


async def run_sse(base, tally, settings, timing):
    """One reply through the SSE relay: a single request whose answer streams every token."""
    connection = Connection(base)
    timing["started_us"] = now_us()
    await connection.send("POST", "/stream", {"content": prompt(settings.tokens, settings.rate)})
    status, headers = await connection.read_head()
    if status != 200:
        raise HttpError(f"POST /stream answered {status}")
    buffer = b""
    finished = False
    try:
        while not finished:
            data = await connection.reader.read(65536)
            if not data:
                break
            received = now_us()
            connection.bytes_received += len(data)
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event == b"data: [DONE]":
                    finished = True
                elif event.startswith(b"data: "):
                    tally.feed(json.loads(event[6:]), received)
                else:
                    raise HttpError(f"stream event {event[:100]!r}")
    finally:
        connection.close()
    if not finished:
        raise HttpError("the stream ended without [DONE]")
    return connection


async def run_memory(base, tally, settings, timing, interval=None):
    """One reply through the in-memory long-poll (or, with interval, short polls every interval seconds)."""
    connection = Connection(base)
    await connection.open()
    timing["started_us"] = now_us()
    reply = await connection.request("POST", "/replies", {"content": prompt(settings.tokens, settings.rate)},
                                     expect=201)
    cursor = "0"
    timeout = 0 if interval else settings.poll_timeout
    next_poll = time.monotonic()
    try:
        while True:
            answer = await connection.request("GET", f"/replies/{reply['id']}/poll?cursor={cursor}&timeout={timeout}")
            tally.feed(answer["text"], now_us())
            cursor = answer["cursor"]
            if answer["done"]:
                if answer.get("error"):
                    raise HttpError(f"reply failed: {answer['error']}")
                return connection
            if interval:
                next_poll += interval
                await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
    finally:
        connection.close()


async def prepare_product(base):
    """Opens a connection as a new owner and creates its conversation (not timed)."""
    connection = Connection(base)
    await connection.open()
    conversation = await connection.request("POST", "/api/conversations", {}, expect=201)
    return connection, conversation["id"]


async def run_product(base, tally, settings, timing, prepared):
    """One reply through the product: post the message, then follow the poll cursors to the end."""
    connection, conversation_id = prepared
    counted_from = (connection.requests, connection.bytes_sent, connection.bytes_received)
    timing["started_us"] = now_us()
    posted = await connection.request("POST", f"/api/conversations/{conversation_id}/messages",
                                      {"content": prompt(settings.tokens, settings.rate)}, expect=202)
    reply_id = posted["reply"]["id"]
    cursor = "0"
    try:
        while True:
            answer = await connection.request(
                "GET", f"/api/messages/{reply_id}/poll?cursor={cursor}&timeout={settings.poll_timeout:g}")
            tally.feed(answer["text"], now_us())
            cursor = answer["cursor"]
            if answer["done"]:
                if answer["status"] != "done":
                    raise HttpError(f"reply ended {answer['status']}: {answer['error']}")
                break
    finally:
        connection.close()
    connection.requests -= counted_from[0]
    connection.bytes_sent -= counted_from[1]
    connection.bytes_received -= counted_from[2]
    return connection


async def run_stream(index, settings, start_at, prepared):
    tally = Tally(settings.tokens)
    timing = {}
    outcome = {"index": index, "error": None}
    connection = None
    await asyncio.sleep(max(0.0, start_at - time.time()))
    try:
        if settings.mode == "sse":
            connection = await run_sse(settings.base, tally, settings, timing)
        elif settings.mode == "memory":
            connection = await run_memory(settings.base, tally, settings, timing)
        elif settings.mode == "shortpoll":
            connection = await run_memory(settings.base, tally, settings, timing, interval=settings.interval)
        else:
            connection = await run_product(settings.base, tally, settings, timing, prepared)
    except (HttpError, OSError, ValueError, KeyError, asyncio.IncompleteReadError) as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
    outcome.update(tally.result())
    started = timing.get("started_us")
    outcome["first_token_ms"] = ((tally.first_token_us - started) / 1000.0
                                 if started and tally.first_token_us else None)
    if connection is not None:
        outcome.update(requests=connection.requests, bytes_sent=connection.bytes_sent,
                       bytes_received=connection.bytes_received)
    return outcome


async def run_all(settings):
    prepared = [None] * len(settings.indexes)
    if settings.mode == "product":
        prepared = await asyncio.gather(*(prepare_product(settings.base) for _ in settings.indexes))
    # Streams start spread evenly over --spread seconds after --start-at, in global index order.
    start_at = settings.start_at or time.time() + 0.2
    offsets = [start_at + settings.spread * index / max(settings.total, 1) for index in settings.indexes]
    return await asyncio.gather(*(run_stream(index, settings, offset, ready)
                                   for index, offset, ready in zip(settings.indexes, offsets, prepared)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--base", required=True, help="Base URL of the server under test.")
    parser.add_argument("--first", type=int, default=0, help="Global index of this process's first stream.")
    parser.add_argument("--streams", type=int, required=True, help="Streams this process runs.")
    parser.add_argument("--total", type=int, default=0, help="Streams across all client processes.")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--poll-timeout", type=float, default=25.0)
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between short polls.")
    parser.add_argument("--start-at", type=float, default=0.0, help="Epoch seconds at which stream 0 starts.")
    parser.add_argument("--spread", type=float, default=1.0, help="Seconds over which stream starts are spread.")
    parser.add_argument("--out", required=True)
    settings = parser.parse_args(argv)
    settings.total = settings.total or settings.streams
    settings.indexes = list(range(settings.first, settings.first + settings.streams))
    wall = time.monotonic()
    results = asyncio.run(run_all(settings))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"pid": os.getpid(), "wall_seconds": time.monotonic() - wall,
              "cpu_seconds": usage.ru_utime + usage.ru_stime, "streams": results}
    with open(settings.out, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
