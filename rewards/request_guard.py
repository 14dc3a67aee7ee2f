"""The scoring server's HTTP guard: what is checked of a request before the app reads its body.

The bearer token and the body size are checked before the body is read (401, 413); the body must
arrive within `body_timeout_s` (408). The app then gets the buffered body, and is cancelled if its
client disconnects before the reply.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor

from fastapi.responses import JSONResponse

log = logging.getLogger("align.serve_rm")

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_BODY_TIMEOUT_S = 60.0  # a whole body, however slow the link: 32 MiB at ~0.5 MiB/s
TRIM_AFTER_BYTES = 2**20  # hand freed heap back to the OS after bodies this large


class _TooLarge(Exception):
    pass


try:  # glibc: malloc_trim hands the heap's free pages back to the OS
    _libc = ctypes.CDLL("libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # another C library: memory is returned as it manages to
    _libc = _malloc_trim = None
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _release_memory() -> None:
    gc.collect()  # a failed parse's exception keeps the parsed body alive in reference cycles
    _malloc_trim(0)


def unmap_large_blocks() -> None:
    """Blocks over 1 MiB (bodies, their text) get their own mappings, unmapped when freed: glibc would
    otherwise raise the threshold and keep them in the heap."""
    if _libc is not None:
        _libc.mallopt(M_MMAP_THRESHOLD, 2**20)


class RequestGuard:
    """ASGI middleware: the bearer token (every path but /health), then the body size, both checked
    before the app reads or parses anything; the body must arrive within `body_timeout_s`. The body is
    buffered here and replayed to the app, which is cancelled if its client disconnects before the
    reply. After large bodies the freed heap is handed back to the OS: glibc would keep it, and the
    server's memory would stay at its peak."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, body_timeout_s: float):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.bytes_since_trim = 0
        self.trimmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="malloc-trim")  # walks the heap
        self.next_trim = None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] != "/health" and not self._authorized(headers.get(b"authorization", b"")):
            return await JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                      401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = JSONResponse({"error": f"request body over the limit of {self.max_bytes} bytes "
                                           "(align serve-rm --max-request-mb)"}, 413)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            if body is not None:  # else the client has gone
                await self._run_app(scope, receive, send, body)
        except _TooLarge:
            await too_large(scope, receive, send)
        except asyncio.TimeoutError:
            await JSONResponse({"error": f"the request body did not arrive within {self.body_timeout_s:g} s"}, 408,
                               headers={"Connection": "close"})(scope, receive, send)
        finally:
            body = None
            self._trim_if_due()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None if the client disconnected; _TooLarge past the limit."""
        chunks, size, more = [], 0, True
        while more:  # the declared length may be absent (chunked) or wrong: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            self.bytes_since_trim += len(chunks[-1])
            if size > self.max_bytes:
                raise _TooLarge
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _run_app(self, scope, receive, send, body: bytes) -> None:
        """The app on the buffered body, cancelled if the client disconnects before the reply is sent
        (the request's items still waiting for a batch are then never scored)."""
        gone, replayed, replied = asyncio.Event(), False, False

        async def replay():
            nonlocal replayed
            if replayed:  # the app asks whether its client has gone
                await gone.wait()
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_noting_reply(message):
            nonlocal replied
            replied = replied or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        app = asyncio.create_task(self.app(scope, replay, send_noting_reply))
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and not replied:
                log.info("%s %s: the client disconnected; request cancelled", scope["method"], scope["path"])
                app.cancel()
            await asyncio.wait({app})
        finally:  # also when this task is cancelled (the shutdown drain ran out): the app goes with it
            watcher.cancel()
            app.cancel()
        if not app.cancelled():
            app.result()  # the app's own error, for the server to log

    def _trim_if_due(self) -> None:
        """After a large request, a trim that starts once this request's memory is free: one queued
        behind the trim in progress, unless one is queued already."""
        if _malloc_trim is None or self.bytes_since_trim < TRIM_AFTER_BYTES:
            return
        self.bytes_since_trim = 0
        if self.next_trim is None or self.next_trim.running() or self.next_trim.done():
            self.next_trim = self.trimmer.submit(_release_memory)
