"""Reading a request body without letting one client hurt the others: a size limit (413), a time limit
(408), a gate that bounds how many large bodies are in memory at once, bounded decompression of a
``Content-Encoding: gzip|deflate`` body (413 past the limit, never a decompression bomb), and a watcher
that notices when the client has gone away (so its queued request can be withdrawn).
"""
from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

from .codecs import HTTPError

CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the client that left


class LargeBodyGate:
    """Bounds how many large bodies are in memory at once: a body past ``threshold`` bytes waits for one
    of ``limit`` slots before more of it is read, and holds the slot until it is decoded."""

    def __init__(self, limit: int, threshold: int):
        self.limit, self.threshold = limit, threshold
        self._sem: asyncio.Semaphore | None = None   # made on the server's loop, at first use

    def admit_one(self) -> "GateSlot":
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        return GateSlot(self._sem, self.threshold)


class GateSlot:
    def __init__(self, sem: asyncio.Semaphore, threshold: int):
        self.sem, self.threshold, self.held = sem, threshold, False

    async def admit(self, size: int) -> None:
        if not self.held and size > self.threshold:
            await self.sem.acquire()
            self.held = True

    async def __aenter__(self) -> "GateSlot":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.held:
            self.sem.release()
            self.held = False


async def read_body(request: Any, limit: int, timeout_s: float, gate: GateSlot) -> bytes:
    """The whole body, or HTTPError 413 (over ``limit``), 408 (slower than ``timeout_s``), 499 (client left)."""
    from starlette.requests import ClientDisconnect
    n = request.headers.get("content-length")
    if n is not None and n.isdigit():
        if int(n) > limit:
            raise HTTPError(413, f"request body of {int(n)} bytes exceeds the limit of {limit} bytes")
        await gate.admit(int(n))
    chunks, size = [], 0
    deadline = time.monotonic() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        left = deadline - time.monotonic()
        try:
            c = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
        except StopAsyncIteration:
            break
        except ClientDisconnect:
            raise HTTPError(CLIENT_CLOSED, f"client went away after sending {size} bytes") from None
        except asyncio.TimeoutError:
            raise HTTPError(408, f"request body not received within {timeout_s:g} s "
                                 f"({size} bytes arrived)", {"Connection": "close"}) from None
        size += len(c)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes", {"Connection": "close"})
        await gate.admit(size)
        chunks.append(c)
    return b"".join(chunks)


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body a ``Content-Encoding`` of gzip or deflate (zlib) compressed, at most ``limit`` bytes of it."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate", "x-gzip"):
        raise HTTPError(415, f"unsupported Content-Encoding {enc[:50]!r}; send gzip, deflate or none")
    d = zlib.decompressobj(47)  # 32 + 15: accept gzip and zlib headers alike
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise HTTPError(400, f"body is not valid {enc} data: {e}") from None
    if len(out) > limit:
        raise HTTPError(413, f"decompressed request body exceeds the limit of {limit} bytes")
    if not d.eof:
        raise HTTPError(400, f"{enc} body is truncated")
    return out


async def client_gone(request: Any) -> None:
    """Returns once the client has closed its connection (the ASGI server's ``http.disconnect``); call it
    after the body is read. A server that keeps handing out empty body messages instead is not watched."""
    empty = 0
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            return
        empty = empty + 1 if not msg.get("body") else 0
        if empty > 2:
            await asyncio.Event().wait()  # never: nothing tells us about this client any more
