"""A small OpenAI-compatible HTTP server for one of our causal LMs (standard library only).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``.

**Prompts.** A completion request's ``prompt`` (a string) is the prompt. For a chat request, when the
tokenizer has a chat template (``tokenizer.chat_template`` set), the prompt is the whole ``messages``
list rendered by it with the generation prompt appended; otherwise it is the content of the last user
message, verbatim (our tiny models have no template). Either way the model sees ``BOS + tokens``, as
in training (:func:`~lmdistill.generation.batching.encode_prompts`; a template that writes the BOS
itself does not get a second one).

**Sampling.** ``temperature: 0`` is greedy, otherwise sampling (``top_p`` optional) seeded by the
request's ``seed`` (default 0), so answers are reproducible. ``max_tokens`` (default 16) may not exceed
the server's ``max_new_tokens_limit``, and prompt plus ``max_tokens`` must fit the model's context.

**Answers.** A non-streamed answer carries ``usage``: ``prompt_tokens`` (the BOS included),
``completion_tokens`` (every generated token, a closing EOS included) and ``total_tokens``. With
``"stream": true`` the answer is a stream of server-sent events, OpenAI's format: ``data: {json}``
chunks with ``choices[0].delta.content`` (chat; the first chunk carries the role) or
``choices[0].text`` (completions), a last chunk with ``finish_reason``, a chunk with ``usage`` and
empty ``choices`` when ``stream_options: {"include_usage": true}``, then ``data: [DONE]``. Tokens are
sent as they are generated; their concatenation is the text of the non-streamed answer (text is
held back while it ends in an incomplete UTF-8 character).

**Validation.** Every parameter is checked and a bad one answers 400 with an OpenAI-style JSON error
whose ``param`` names it (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``n``, ``stream``,
``prompt``, ``messages``, ``Content-Length``); numbers must be finite (``NaN``/``Infinity`` are
refused). Unknown fields are ignored.

**Limits.** The API key (``Authorization: Bearer <key>``), the route and ``Content-Length`` are
checked before any of the body is read, so a refused request costs no memory: 401/404, 411 (no
``Content-Length``; chunked bodies are not supported), 413 (over ``max_body_bytes``) close the
connection, discarding what the client still sends for a moment so it can read the answer. A request
must arrive whole (line, headers, body) within ``timeout`` seconds of the connection's previous request
(or of connecting), else the connection is closed (408 once the headers are in): a client that stalls or
trickles cannot hold a thread. At most ``max_connections`` connections are served at once (each one's
requests waiting their turn at the model); a further connection is answered ``503`` with
``Retry-After: 1`` at once and closed, never queued.

It serves a local teacher to anything that speaks the protocol, and it is the real server the
black-box client is tested against: requests whose key and body were accepted are logged
(``requests``, the newest ``log_size``; a refused request is logged without its body), and a ``fault``
hook can make chosen requests fail with a status, stall past the client's timeout, or wait for an
event. Binds 127.0.0.1 by default; the model answers one request at a time (a lock around it).
"""

from __future__ import annotations

import collections
import hmac
import io
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import torch

from lmdistill.generation.batching import bos_id_of, encode_prompts, encode_texts, pad_id_of
from lmdistill.generation.sampling import SamplingParams, generate, next_tokens, strip_eos
from lmdistill.generation.server_http import (  # noqa: F401  (Fault, RequestInfo: public)
    DEFAULT_MAX_TOKENS,
    LINGER_BYTES,
    LINGER_SECONDS,
    SEED_RANGE,
    Fault,
    Job,
    RequestError,
    RequestInfo,
    _DeadlineReader,
    _integer,
    _number,
    _Server,
)

log = logging.getLogger(__name__)


class ModelServer:
    """Serve ``model`` + ``tokenizer`` under ``model_name``; use as a context manager or call
    :meth:`start` / :meth:`stop`. ``api_key``: when set, requests need ``Authorization: Bearer <key>``.
    Limits (see the module docstring): ``max_body_bytes`` per request body, ``timeout`` seconds for a
    request to arrive (and for each write of the answer), ``max_connections`` served at once, and
    ``max_new_tokens_limit`` per answer."""

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
        max_body_bytes: int = 1 << 20,
        timeout: float = 30.0,
        max_connections: int = 32,
        log_size: int = 10_000,
    ) -> None:
        if max_body_bytes < 1 or timeout <= 0 or max_connections < 1 or max_new_tokens_limit < 1 or log_size < 0:
            raise ValueError("ModelServer: max_body_bytes, timeout, max_connections and max_new_tokens_limit must be "
                             "positive and log_size non-negative")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.fault = fault
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.max_connections = max_connections
        self.log_size = log_size
        self.context = self._context_of(model)
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=log_size)
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._n_total = 0
        self._log_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._httpd = _Server((host, port), self._handler_class(), max_connections)
        self._thread: threading.Thread | None = None

    @staticmethod
    def _context_of(model: torch.nn.Module) -> int | None:
        config = getattr(model, "config", None)
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return self._httpd.active

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="model-server", daemon=True)
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
        """How many accepted requests carried ``prompt`` (whatever their outcome; the newest
        ``log_size`` distinct prompts are counted)."""
        with self._log_lock:
            return self._counts.get(prompt, 0)

    def _log(self, path: str, prompt: str | None, authorization: str | None) -> tuple[dict[str, Any], RequestInfo]:
        with self._log_lock:
            self._n_total += 1
            n_for_prompt = 0
            if prompt is not None and self.log_size:
                n_for_prompt = self._counts.pop(prompt, 0) + 1
                self._counts[prompt] = n_for_prompt
                while len(self._counts) > self.log_size:
                    self._counts.popitem(last=False)
            record = {"path": path, "prompt": prompt, "n_for_prompt": n_for_prompt, "time": time.time(), "outcome": None}
            self.requests.append(record)
            return record, RequestInfo(path, prompt, authorization, n_for_prompt, self._n_total)

    # ------------------------------------------------------------------------------ answering
    def prompt_ids(self, text: str, *, templated: bool = False) -> list[int]:
        """``BOS + tokens`` of ``text``; a templated text that starts with the BOS keeps just that one."""
        ids = list(encode_texts(self.tokenizer, [text])[0])
        bos = bos_id_of(self.tokenizer)
        return ids if templated and ids and ids[0] == bos else [bos] + ids

    def complete(self, prompt: str, max_tokens: int, temperature: float, top_p: float | None, seed: int) -> tuple[str, str]:
        """(text, finish_reason) for one prompt (no validation: see :meth:`job`)."""
        params = SamplingParams(greedy=temperature <= 0, temperature=max(temperature, 1e-6), top_p=top_p,
                                max_new_tokens=max_tokens)
        out = self._generate(encode_prompts(self.tokenizer, [prompt])[0], params, seed)
        return self._text(out), self._finish(out)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)

    def _generate(self, ids: list[int], params: SamplingParams, seed: int) -> list[int]:
        with self._model_lock:
            return generate(self.model, [ids], eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad_id_of(self.tokenizer),
                            params=params, generator=self._generator(seed), vocab_size=len(self.tokenizer))[0]

    @torch.no_grad()
    def _tokens(self, ids: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        """The tokens :func:`~lmdistill.generation.sampling.generate` would return for ``ids`` alone, one
        at a time as they are computed (the same arithmetic: one row, no padding, the KV cache). The
        caller holds the model lock while it iterates."""
        device = next(self.model.parameters()).device
        eos = self.tokenizer.eos_token_id
        generator = self._generator(seed)
        step = torch.tensor([ids], dtype=torch.long, device=device)
        mask = torch.ones_like(step)
        positions = torch.arange(len(ids), device=device)[None]
        past = None
        for _ in range(params.max_new_tokens):
            result = self.model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(next_tokens(result.logits[:, -1, : len(self.tokenizer)], params, generator)[0])
            yield token
            if token == eos:
                return
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype, device=device)], dim=1)
            step = torch.tensor([[token]], dtype=torch.long, device=device)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(strip_eos(tokens, self.tokenizer.eos_token_id), skip_special_tokens=True)

    def _finish(self, tokens: list[int]) -> str:
        return "stop" if tokens and tokens[-1] == self.tokenizer.eos_token_id else "length"

    def _prompt_text(self, kind: str, body: dict[str, Any]) -> tuple[str, str, bool]:
        """(the logged prompt, the text the model continues, whether a chat template made it)."""
        if kind == "completions":
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                got = "nothing" if prompt is None else json.dumps(prompt)[:40]
                raise RequestError(400, f"prompt must be a non-empty string (got {got})", "prompt")
            return prompt, prompt, False
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            got = "nothing" if messages is None else json.dumps(messages)[:40]
            raise RequestError(400, f"messages must be a non-empty list of {{role, content}} objects (got {got})", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"messages[{i}] must be an object with a string role", "messages")
            if not isinstance(m.get("content"), str):
                raise RequestError(400, f"messages[{i}].content must be a string", "messages")
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users or not users[-1]:
            raise RequestError(400, "messages needs a user message with non-empty content", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # the template's own checks (roles, order) speak for themselves
                detail = " ".join(str(exc).split())[:200]
                raise RequestError(400, f"messages: the chat template refused them: {detail}", "messages") from None
            return users[-1], text, True
        return users[-1], users[-1], False

    def job(self, kind: str, body: dict[str, Any], prompt_text: str, templated: bool) -> Job:
        """Validate a request body's parameters (RequestError on the first bad one)."""
        max_tokens = _integer(body, "max_tokens", None)
        given = max_tokens is not None
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise RequestError(400, f"max_tokens must be at least 1 (got {max_tokens})", "max_tokens")
        if max_tokens > self.max_new_tokens_limit:
            raise RequestError(400, f"max_tokens must be at most {self.max_new_tokens_limit} (this server's limit; got "
                                    f"{max_tokens})", "max_tokens")
        if self.context is not None and max_tokens > self.context - 1:
            raise RequestError(400, f"max_tokens must be at most {self.context - 1}: the model's context is {self.context} "
                                    f"tokens (got {max_tokens})", "max_tokens")
        temperature = _number(body, "temperature", 1.0)
        if temperature < 0:
            raise RequestError(400, f"temperature must be at least 0 (got {temperature})", "temperature")
        top_p = _number(body, "top_p", None)
        if top_p is not None and not 0 < top_p <= 1:
            raise RequestError(400, f"top_p must be in (0, 1] (got {top_p})", "top_p")
        seed = _integer(body, "seed", 0)
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise RequestError(400, f"seed must be a 64-bit integer (got {seed})", "seed")
        n = _integer(body, "n", 1)
        if n != 1:
            raise RequestError(400, f"n must be 1: this server returns one choice (got {n})", "n")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise RequestError(400, f"stream must be true or false (got {json.dumps(stream)[:40]})", "stream")
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
            raise RequestError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
        prompt_param = "prompt" if kind == "completions" else "messages"
        ids = self.prompt_ids(prompt_text, templated=templated)
        if len(ids) < 2:
            raise RequestError(400, f"{prompt_param} has no tokens", prompt_param)
        if self.context is not None:
            if len(ids) >= self.context:
                raise RequestError(400, f"{prompt_param}: the prompt has {len(ids)} tokens, over the model's context of "
                                        f"{self.context}; shorten it", prompt_param)
            if len(ids) + max_tokens > self.context:
                param = "max_tokens" if given else prompt_param
                raise RequestError(
                    400, f"{param}: the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, over the model's context "
                         f"of {self.context}; lower max_tokens to {self.context - len(ids)} or shorten the prompt", param)
        params = SamplingParams(greedy=temperature <= 0, temperature=max(temperature, 1e-6), top_p=top_p,
                                max_new_tokens=max_tokens)
        return Job(kind, ids, params, seed, bool(stream), bool(options and options.get("include_usage")))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests count requests instead
                pass

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # replaced by one that enforces the request deadline
                self._reader = _DeadlineReader(self.connection)
                self.rfile = io.BufferedReader(self._reader, 1 << 16)

            def handle_one_request(self) -> None:
                # the next request, its headers and body must all arrive within `timeout`
                self._reader.deadline = time.monotonic() + server.timeout
                try:
                    super().handle_one_request()
                except (TimeoutError, ConnectionError):
                    self.close_connection = True

            def handle_expect_100(self) -> bool:
                return True  # "100 Continue" is sent once the key and Content-Length are accepted

            def _writing(self) -> None:
                self._reader.deadline = None
                self.connection.settimeout(server.timeout)

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode("utf-8")
                self._writing()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    if self.close_connection:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True  # the client gave up (timeout) before we answered

            def _error(self, exc: RequestError, record: dict[str, Any] | None) -> None:
                if record is not None:
                    record["outcome"] = exc.status
                if exc.body_unread:
                    self.close_connection = True
                kind = "invalid_request_error" if exc.status < 500 else "server_error"
                self._send(exc.status, {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": None}})
                if exc.body_unread:
                    self._linger()

            def _linger(self) -> None:
                """Close after discarding, for a bounded time, what the client still sends: closing with
                unread bytes would reset the connection and could destroy the answer before it is read."""
                try:
                    self.connection.shutdown(socket.SHUT_WR)
                    end, budget = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
                    while budget > 0 and (left := end - time.monotonic()) > 0:
                        self.connection.settimeout(left)
                        chunk = self.connection.recv(min(budget, 1 << 16))
                        if not chunk:
                            break
                        budget -= len(chunk)
                except OSError:
                    pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._reader.deadline = None
                if self.path.split("?", 1)[0].rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path[:200]}", "type": "invalid_request_error",
                                               "param": None, "code": None}})

            def do_POST(self) -> None:  # noqa: N802
                record: dict[str, Any] | None = None
                try:
                    record = self._post()
                except RequestError as exc:
                    if record is None:  # refused before its body was read: logged without it
                        record, _ = server._log(self.path, None, None)
                    self._error(exc, record)

            def _content_length(self) -> int:
                if self.headers.get("Transfer-Encoding"):
                    raise RequestError(411, "send the body with a Content-Length (chunked request bodies are not "
                                            "supported)", "Content-Length", body_unread=True)
                values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
                if not values:
                    raise RequestError(411, "a POST needs a Content-Length header", "Content-Length", body_unread=True)
                if len(values) > 1:
                    raise RequestError(400, "conflicting Content-Length headers", "Content-Length", body_unread=True)
                value = values.pop()
                if not (value.isascii() and value.isdigit()):
                    raise RequestError(400, f"Content-Length must be a non-negative integer (got {value[:40]!r})",
                                       "Content-Length", body_unread=True)
                length = int(value)
                if length > server.max_body_bytes:
                    raise RequestError(413, f"the request body ({length} bytes) is over this server's limit of "
                                            f"{server.max_body_bytes} bytes", "Content-Length", body_unread=True)
                return length

            def _read_body(self, length: int) -> bytes | None:
                try:
                    raw = self.rfile.read(length)
                except TimeoutError:
                    raise RequestError(408, f"the request body did not arrive within {server.timeout}s", None,
                                       body_unread=True) from None
                except OSError:
                    raw = b""
                if len(raw) < length:  # the client went away: nobody to answer
                    self.close_connection = True
                    return None
                return raw

            def _post(self) -> dict[str, Any] | None:
                """Answer one POST; the request's log record (None before its body is read)."""
                path = self.path.split("?", 1)[0].rstrip("/")
                kind = "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else None
                if kind is None:
                    raise RequestError(404, f"no route {self.path[:200]}", None, body_unread=True)
                authorization = self.headers.get("Authorization")
                if server.api_key is not None:
                    expected = f"Bearer {server.api_key}".encode("utf-8")
                    if not hmac.compare_digest((authorization or "").encode("utf-8", "replace"), expected):
                        raise RequestError(401, "invalid API key", None, body_unread=True)
                length = self._content_length()
                if self.headers.get("Expect", "").lower() == "100-continue":
                    self.send_response_only(100)
                    self.end_headers()
                raw = self._read_body(length)
                if raw is None:
                    return None
                self._reader.deadline = None  # the request is in; the time to answer is not bounded here
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    raise RequestError(400, f"the body is not valid JSON: {str(exc)[:100]}", None) from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the body must be a JSON object", None)
                try:
                    prompt, text, templated = server._prompt_text(kind, body)
                    problem = None
                except RequestError as exc:
                    prompt, text, templated, problem = None, "", False, exc
                record, info = server._log(self.path, prompt, authorization)
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
                        return record
                try:
                    if problem is not None:
                        raise problem
                    job = server.job(kind, body, text, templated)
                    if job.stream:
                        self._stream(job, record)
                    else:
                        self._answer(job, record)
                except RequestError as exc:
                    self._error(exc, record)
                except Exception as exc:  # a failure of ours: answer it rather than drop the connection
                    log.exception("generation failed")
                    self.close_connection = True
                    self._error(RequestError(500, f"generation failed: {type(exc).__name__}", None), record)
                return record

            def _head(self, job: Job) -> dict[str, Any]:
                obj = "chat.completion" if job.kind == "chat" else "text_completion"
                return {"id": f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:12]}",
                        "object": obj + ".chunk" if job.stream and job.kind == "chat" else obj,
                        "created": int(time.time()), "model": server.model_name}

            @staticmethod
            def _usage(job: Job, n_generated: int) -> dict[str, int]:
                return {"prompt_tokens": len(job.ids), "completion_tokens": n_generated,
                        "total_tokens": len(job.ids) + n_generated}

            def _answer(self, job: Job, record: dict[str, Any]) -> None:
                out = server._generate(job.ids, job.params, job.seed)
                text, finish = server._text(out), server._finish(out)
                if job.kind == "chat":
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": finish}
                record["outcome"] = 200
                self._send(200, {**self._head(job), "choices": [choice], "usage": self._usage(job, len(out))})

            def _event(self, payload: dict[str, Any] | str) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                chunk = f"data: {data}\n\n".encode("utf-8")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # HTTP/1.1 chunked framing

            def _stream(self, job: Job, record: dict[str, Any]) -> None:
                head = self._head(job)
                chat = job.kind == "chat"

                def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
                    if chat:
                        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
                        if piece is not None:
                            delta["content"] = piece
                        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    return {**head, "choices": [{"index": 0, "text": piece or "", "finish_reason": finish}]}

                self._writing()
                tokens: list[int] = []
                record["outcome"] = 200
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    if chat:
                        self._event(chunk(None, first=True))
                    sent = ""
                    # the client reads as we generate: a stalled one is cut by the write timeout, which
                    # frees the model for the others
                    with server._model_lock:
                        for token in server._tokens(job.ids, job.params, job.seed):
                            tokens.append(token)
                            text = server._text(tokens).rstrip("\ufffd")  # an incomplete UTF-8 character waits
                            if len(text) > len(sent) and text.startswith(sent):
                                self._event(chunk(text[len(sent):]))
                                sent = text
                    text = server._text(tokens)
                    if len(text) > len(sent) and text.startswith(sent):
                        self._event(chunk(text[len(sent):]))
                    self._event(chunk(None, server._finish(tokens)))
                    if job.include_usage:
                        self._event({**head, "choices": [], "usage": self._usage(job, len(tokens))})
                    self._event("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True  # the client went away or stopped reading
                except Exception:  # the status is sent: cut the stream short rather than answer twice
                    log.exception("generation failed while streaming")
                    record["outcome"] = 500
                    self.close_connection = True

        return Handler
