"""A small OpenAI-compatible HTTP server for one of our causal LMs (standard library only).

``POST /v1/chat/completions`` and ``POST /v1/completions`` answer with the model's continuation of
the prompt (for chat: the content of the last user message, used verbatim as the prompt: our tiny
models have no chat template); ``GET /v1/models`` lists the model. ``temperature: 0`` is greedy,
otherwise sampling seeded by the request's ``seed`` (default 0), so answers are reproducible.

It serves a local teacher to anything that speaks the protocol, and it is the real server the
black-box client is tested against: every request is logged (``requests``), and a ``fault`` hook can
make chosen requests fail with a status, stall past the client's timeout, or wait for an event.
Binds 127.0.0.1 by default; requests are answered one at a time (a lock around the model).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from lmdistill.generation.batching import encode_prompts, pad_id_of
from lmdistill.generation.sampling import SamplingParams, generate, strip_eos


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


class ModelServer:
    """Serve ``model`` + ``tokenizer`` under ``model_name``; use as a context manager or call
    :meth:`start` / :meth:`stop`. ``api_key``: when set, requests need ``Authorization: Bearer <key>``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_name: str = "lmdistill-local",
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        fault: Callable[[RequestInfo], Fault | None] | None = None,
        max_new_tokens_limit: int = 256,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.fault = fault
        self.max_new_tokens_limit = max_new_tokens_limit
        self.requests: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self._log_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="model-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def count(self, prompt: str) -> int:
        """How many requests carrying ``prompt`` arrived (whatever their outcome)."""
        with self._log_lock:
            return self._counts.get(prompt, 0)

    # ------------------------------------------------------------------------------ answering
    def complete(self, prompt: str, max_tokens: int, temperature: float, top_p: float | None, seed: int) -> tuple[str, str]:
        """(text, finish_reason) for one prompt."""
        params = SamplingParams(
            greedy=temperature <= 0, temperature=max(temperature, 1e-6), top_p=top_p,
            max_new_tokens=max(1, min(max_tokens, self.max_new_tokens_limit)),
        )
        eos = self.tokenizer.eos_token_id
        with self._model_lock:
            ids = encode_prompts(self.tokenizer, [prompt])
            out = generate(self.model, ids, eos_token_id=eos, pad_token_id=pad_id_of(self.tokenizer), params=params,
                           generator=torch.Generator().manual_seed(seed), vocab_size=len(self.tokenizer))[0]
        finish = "stop" if out and out[-1] == eos else "length"
        return self.tokenizer.decode(strip_eos(out, eos), skip_special_tokens=True), finish

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests count requests instead
                pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.rstrip("/")
                kind = "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else None
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = None
                prompt = None
                if isinstance(body, dict):
                    if kind == "chat":
                        users = [m.get("content") for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
                        prompt = users[-1] if users else None
                    elif kind == "completions":
                        prompt = body.get("prompt")
                with server._log_lock:
                    n_for_prompt = 0
                    if isinstance(prompt, str):
                        server._counts[prompt] = server._counts.get(prompt, 0) + 1
                        n_for_prompt = server._counts[prompt]
                    info = RequestInfo(self.path, prompt if isinstance(prompt, str) else None,
                                       self.headers.get("Authorization"), n_for_prompt, len(server.requests) + 1)
                    record = {"path": self.path, "prompt": info.prompt, "n_for_prompt": n_for_prompt, "time": time.time(),
                              "outcome": None}
                    server.requests.append(record)
                fault = server.fault(info) if server.fault is not None else None
                if fault is not None:
                    if fault.wait is not None:
                        fault.wait.wait(timeout=60)
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.status is not None:
                        record["outcome"] = fault.status
                        extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
                        self._send(fault.status, {"error": {"message": "injected fault", "type": "server_error"}}, extra)
                        return
                if kind is None:
                    record["outcome"] = 404
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    record["outcome"] = 401
                    self._send(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
                    return
                if not isinstance(prompt, str) or not prompt:
                    record["outcome"] = 400
                    self._send(400, {"error": {"message": "no prompt (completions) or user message (chat)"}})
                    return
                try:
                    max_tokens = int(body.get("max_tokens") or 16)
                    temperature = float(body.get("temperature", 1.0))
                    top_p = body.get("top_p")
                    seed = int(body.get("seed") or 0)
                    text, finish = server.complete(prompt, max_tokens, temperature, None if top_p is None else float(top_p), seed)
                except (TypeError, ValueError) as exc:
                    record["outcome"] = 400
                    self._send(400, {"error": {"message": f"bad request: {exc}"}})
                    return
                record["outcome"] = 200
                created = int(time.time())
                if kind == "chat":
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": text, "finish_reason": finish}
                    obj = "text_completion"
                self._send(200, {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": obj, "created": created,
                                 "model": server.model_name, "choices": [choice]})

        return Handler
