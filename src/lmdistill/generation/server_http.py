"""The HTTP side of ``lmdistill serve`` (:mod:`lmdistill.generation.server`): requests' validation errors and
number checks, the validated request (:class:`Job`), reads bounded by a deadline, a connection-bounded threading
server, and the fault hook tests use."""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmdistill.generation.sampling import SamplingParams

log = logging.getLogger("lmdistill.generation.server")

DEFAULT_MAX_TOKENS = 16
# after refusing a request whose body was not read, what the client still sends is discarded for at
# most this long / this much, so that closing does not reset the connection before it reads the answer
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class Fault:
    """What to do to one request before answering it: wait for ``wait`` (an event), sleep ``delay``
    seconds, then answer with HTTP ``status`` (an error body) or, when ``status`` is None, normally."""

    status: int | None = None
    delay: float = 0.0
    wait: threading.Event | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class RequestInfo:
    path: str
    prompt: str | None
    authorization: str | None
    n_for_prompt: int  # 1 for the first request carrying this prompt
    n_total: int


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a one-line ``message``, the ``param`` at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, *, body_unread: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.body_unread = body_unread  # the connection cannot carry another request


@dataclass(frozen=True)
class Job:
    """A validated request: the prompt's token ids and how to continue them."""

    kind: str  # "chat" or "completions"
    ids: list[int]
    params: SamplingParams
    seed: int
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{name} must be a number (got {json.dumps(value)[:40]})", name)
    if not math.isfinite(value):
        raise RequestError(400, f"{name} must be a finite number (got {value})", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        shown = value if isinstance(value, float) else json.dumps(value)[:40]
        raise RequestError(400, f"{name} must be an integer (got {shown})", name)
    return value


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, every read waiting at most until ``deadline`` (``time.monotonic``):
    a per-read timeout alone would let a client sending a byte now and then hold the connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request did not arrive in time")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        self.active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._busy(request)
            return
        with self._active_lock:
            self.active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self.active -= 1
        self.slots.release()

    def _busy(self, request: socket.socket) -> None:
        """503 from the accepting thread: a fresh socket's send buffer takes it without blocking."""
        body = json.dumps({"error": {"message": "server busy: too many connections, retry later",
                                     "type": "server_error", "param": None, "code": None}}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error while serving %s", client_address, exc_info=True)
