"""The black-box client against hostile or broken servers on 127.0.0.1: redirects must not carry the key
anywhere, a server echoing the key must not get it into messages or logs, and ``timeout`` bounds a whole
request even when the server trickles its answer."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmdistill.generation.blackbox import BlackBoxError, BlackBoxTeacher
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig

KEY = "sk-test-secret-9f8e7d6c5b4a3210"  # a made-up key
ENV = {"LMDISTILL_TEST_KEY": KEY}
GREEDY = SamplingConfig(greedy=True, max_new_tokens=8)


def key_fragments_in(text: str, key: str = KEY, size: int = 8) -> list[str]:
    """Every piece of ``key`` of ``size`` characters found in ``text`` (a cut-off key leaks too)."""
    return [key[i : i + size] for i in range(len(key) - size + 1) if key[i : i + size] in text]


def answer(text: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "text": text, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]}).encode()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _drain(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, threading.Thread]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[dict[str, str | None]]]]:
    """A server on its own port (another origin) that records what each request carried."""
    seen: list[dict[str, str | None]] = []

    class Recorder(_Quiet):
        def _record(self) -> None:
            seen.append({"method": self.command, "authorization": self.headers.get("Authorization")})
            self._drain()
            self._reply(200, answer("from the redirect target"))

        do_GET = do_POST = _record  # noqa: N815

    httpd, thread = serve(Recorder)
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def client(base_url: str, **kw: object) -> BlackBoxTeacher:
    cfg = dict(base_url=base_url, model="m", endpoint="completions", api_key_env="LMDISTILL_TEST_KEY",
               timeout=5.0, max_retries=0, backoff_base=0.0)
    return BlackBoxTeacher(BlackBoxConfig(**{**cfg, **kw}), sampling=GREEDY, environ=ENV, sleep=lambda s: None)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("same_origin", [False, True])
def test_redirects_are_refused_and_the_key_goes_nowhere(recorder, status, same_origin, caplog):
    caplog.set_level(logging.DEBUG)
    target_origin, seen = recorder
    hits: list[str | None] = []

    class Redirector(_Quiet):
        def do_POST(self) -> None:  # noqa: N802
            hits.append(self.headers.get("Authorization"))
            self._drain()
            if self.path.startswith("/elsewhere"):  # the same-origin target, were it followed
                self._reply(200, answer("followed"))
                return
            origin = f"http://127.0.0.1:{self.server.server_address[1]}" if same_origin else target_origin
            self._reply(status, b"{}", {"Location": f"{origin}/elsewhere/v1/completions"})

        do_GET = do_POST  # noqa: N815

    httpd, _ = serve(Redirector)
    try:
        teacher = client(f"http://127.0.0.1:{httpd.server_address[1]}/v1", max_retries=2)
        with pytest.raises(BlackBoxError) as info:
            teacher.complete("In the beginning")
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(info.value)
    assert f"HTTP {status}" in message and "/elsewhere/v1/completions" in message and "redirect" in message
    assert info.value.status == status and not info.value.retryable
    assert seen == []  # the other origin received no request at all
    assert hits == [f"Bearer {KEY}"]  # one request, to the configured endpoint only; no retry, no follow
    assert not key_fragments_in(message) and not key_fragments_in(caplog.text)


class _Echo(_Quiet):
    """Answers every request with ``status`` and a body that echoes the Authorization header after
    ``pad`` (so the key sits wherever a client might cut the body)."""

    status = 400
    pad = ""

    def do_POST(self) -> None:  # noqa: N802
        self._drain()
        auth = self.headers.get("Authorization") or ""
        body = json.dumps({"error": {"message": self.pad + f" bad header {auth!r} " + "y" * 50}}).encode()
        self._reply(self.status, body, {"X-Echo": auth})


@pytest.mark.parametrize("status", [400, 401, 500])
def test_an_error_body_echoing_the_key_never_reaches_messages_or_logs(status, caplog):
    caplog.set_level(logging.DEBUG)
    messages = []
    handler = type("Echo", (_Echo,), {"status": status})
    httpd, _ = serve(handler)
    try:
        teacher = client(f"http://127.0.0.1:{httpd.server_address[1]}/v1", max_retries=1 if status >= 500 else 0)
        # the key across each place a client may cut: text, and whitespace that an excerpt collapses
        for pad in [char * n for n in (0, 150, 175, 185, 190, 195, 230, 240, 250, 270, 290, 4030, 4040, 4050, 6000)
                    for char in "x "]:
            handler.pad = pad
            with pytest.raises(BlackBoxError) as info:
                teacher.complete("In the beginning")
            assert info.value.status == status or (status >= 500 and info.value.retryable)
            messages.append(str(info.value))
    finally:
        httpd.shutdown()
        httpd.server_close()
    joined = "\n".join(messages)
    assert f"HTTP {status}" in joined and "bad header" in joined  # the body is still shown, redacted
    assert "[redacted]" in joined
    assert not key_fragments_in(joined), key_fragments_in(joined)
    assert not key_fragments_in(caplog.text), key_fragments_in(caplog.text)


class Trickle:
    """A raw-socket server that reads a request and then sends its answer one byte every ``interval``
    seconds (the status line and headers too when ``headers_too``), for at most ``limit`` seconds."""

    def __init__(self, *, headers_too: bool, interval: float = 0.5, limit: float = 20.0) -> None:
        self.headers_too = headers_too
        self.interval = interval
        self.limit = limit
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                while len(body) < length:
                    body += conn.recv(65536)
                payload = answer("a slow answer " * 4)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                if not self.headers_too:
                    conn.sendall(head)
                    head = b""
                end = time.monotonic() + self.limit
                for byte in head + payload:
                    if time.monotonic() > end or self.closed.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(self.interval)
            except OSError:
                return  # the client gave up

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


@pytest.mark.parametrize("headers_too", [False, True])
def test_timeout_bounds_the_whole_request_against_a_trickling_server(headers_too):
    server = Trickle(headers_too=headers_too)
    timeout, retries = 2.0, 1
    try:
        teacher = client(server.url, timeout=timeout, max_retries=retries)
        start = time.monotonic()
        with pytest.raises(BlackBoxError) as info:
            teacher.complete("In the beginning")
        elapsed = time.monotonic() - start
    finally:
        server.close()
    attempts = retries + 1
    assert server.connections == attempts and info.value.retryable
    assert "timed out" in str(info.value)
    # each attempt is cut at `timeout` (plus scheduling slack), whatever the server keeps sending
    assert timeout * attempts - 0.2 <= elapsed < timeout * attempts + 1.5, elapsed


def test_a_fast_answer_is_not_cut_by_the_whole_request_deadline(recorder):
    """The deadline is per attempt: a server answering in time is not affected, and the watchdog
    of a finished request does not fire into the next one."""
    origin, seen = recorder
    teacher = client(origin + "/v1", timeout=0.5)
    for _ in range(3):
        assert teacher.complete("In the beginning").text == "from the redirect target"
        time.sleep(0.3)
    assert len(seen) == 3 and all(s["authorization"] == f"Bearer {KEY}" for s in seen)
