"""A black-box teacher: any OpenAI-compatible ``/chat/completions`` or ``/completions`` endpoint.

Only the teacher's text is available (no logits), so a black-box teacher feeds sequence-level KD
(Kim & Rush 2016, "Sequence-Level Knowledge Distillation", arXiv 1606.07947): its answers become
the responses the student trains on.

Behaviour the caller can rely on:

- **the key stays secret**: it is read from the environment variable named in the config
  (``api_key_env``) when the client is built, sent only in the ``Authorization`` header, and never
  logged, put in an error message, a ``repr`` or the store;
- **concurrency**: up to ``concurrency`` requests in flight (threads; the work is network-bound);
- **retries with backoff**: HTTP 5xx, 429 and 408, timeouts, refused/reset connections and
  malformed bodies are retried up to ``max_retries`` times, waiting
  ``min(backoff_max, backoff_base * 2^attempt)`` scaled by a random factor in [0.5, 1] (jitter keeps
  concurrent clients from retrying in lockstep), or the server's ``Retry-After`` when it is longer;
  other 4xx errors (bad request, bad key) fail at once;
- **a request timeout**: ``timeout`` seconds bound a whole attempt (connecting, sending, the status,
  the headers and the body together), not each socket read: a server trickling its answer a byte at a
  time is cut off at the deadline and the attempt counts as timed out (retryable);
- **no redirects**: a 3xx answer fails at once with an error naming its ``Location``, whatever the
  target's origin. Following one would send the ``Authorization`` header (the key) to wherever the
  server points, and a redirected POST is not replayed faithfully anyway (301/302/303 turn into a
  GET); point ``base_url`` at the final address instead;
- **error bodies are redacted**: what a server answers is shown in errors (a short, whitespace-collapsed
  excerpt) only after every occurrence of the key, and a key cut off at the excerpt's end, is replaced
  by ``[redacted]``, since some servers echo the request's headers;
- **resumable**: every completed answer is appended to a :class:`~lmdistill.generation.store.ResponseStore`
  the moment it arrives; a rerun requests only prompts whose key is not stored, so a crash loses no
  paid-for completion and nothing already answered is requested again.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig
from lmdistill.generation.store import ResponseStore, request_key

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429})
ERROR_BODY_BYTES = 4096  # how much of an error answer is read to quote it
ERROR_EXCERPT_CHARS = 300
REDACTED = "[redacted]"


class BlackBoxError(LmdistillError):
    """A request to the teacher endpoint failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    attempts: int = 1


@dataclass
class StoreReport:
    """What a :meth:`BlackBoxTeacher.fill_store` call did."""

    requested: int = 0
    already_stored: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (prompt, error)


class _StatusError(Exception):
    """A non-2xx answer, its body already read (under the attempt's deadline)."""

    def __init__(self, status: int, body: bytes, retry_after: float | None, location: str | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.location = location


class _Deadline:
    """Bounds one attempt: when ``seconds`` have passed, every socket the attempt opened is shut down,
    which wakes any read or write blocked on it (socket timeouts alone bound each read, so a server
    sending a byte per read would hold the request forever). Sockets are shut down through their own
    objects: a socket already closed has no file descriptor left, so a reused descriptor is never hit."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)
        return sock

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            # socket.socket's own shutdown: an SSLSocket's would drop its TLS state under a reading thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    def finish(self) -> None:
        with self._lock:
            self._done = True
            self._sockets.clear()
        self._timer.cancel()


def _watched(base: type[http.client.HTTPConnection], deadline: _Deadline) -> type[http.client.HTTPConnection]:
    """``base`` whose sockets (the TCP one, then the TLS one wrapping it) are watched by ``deadline``."""

    class Connection(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            create = self._create_connection
            self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

        def connect(self) -> None:
            super().connect()
            deadline.watch(self.sock)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._connection = _watched(http.client.HTTPConnection, deadline)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._connection = _watched(http.client.HTTPSConnection, deadline)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req, context=self._context)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every 3xx into an error (see the module docstring): a subclass, so build_opener drops the
    default handler that would follow it with the Authorization header."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> None:
        location = headers.get("Location") or headers.get("URI")
        if fp is not None:
            fp.close()
        raise _StatusError(code, b"", None, urljoin(req.full_url, location) if location else None)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class BlackBoxTeacher:
    """Client for one endpoint/model (see the module docstring)."""

    def __init__(
        self,
        config: BlackBoxConfig,
        *,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.sampling = sampling or SamplingConfig(greedy=True)
        self.seed = seed
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        env = os.environ if environ is None else environ
        self.__api_key: str | None = None
        if config.api_key_env:
            key = env.get(config.api_key_env)
            if not key:
                raise ConfigError(
                    f"blackbox.api_key_env names the environment variable {config.api_key_env!r}, which is not set; "
                    f"export it (or set blackbox.api_key_env: null for an endpoint without a key)"
                )
            self.__api_key = key
        suffix = "/chat/completions" if config.endpoint == "chat" else "/completions"
        self.url = config.base_url.rstrip("/") + suffix

    def __repr__(self) -> str:  # never show the key
        return f"BlackBoxTeacher(url={self.url!r}, model={self.config.model!r}, key={'set' if self.__api_key else 'none'})"

    # ------------------------------------------------------------------------------ one request
    @property
    def teacher_id(self) -> str:
        return f"blackbox:{self.url}|{self.config.model}"

    def params(self) -> dict[str, Any]:
        """The non-secret settings that decide an answer (part of the store key)."""
        s = self.sampling
        out: dict[str, Any] = {"max_tokens": s.max_new_tokens, "temperature": 0.0 if s.greedy else s.temperature}
        if s.top_p is not None and not s.greedy:
            out["top_p"] = s.top_p
        if self.seed is not None:
            out["seed"] = self.seed
        if self.config.system_prompt:
            out["system"] = self.config.system_prompt
        if self.config.extra_body:
            out["extra"] = self.config.extra_body
        return out

    def request_body(self, prompt: str) -> dict[str, Any]:
        p = self.params()
        body: dict[str, Any] = {"model": self.config.model, "max_tokens": p["max_tokens"], "temperature": p["temperature"], "n": 1}
        if "top_p" in p:
            body["top_p"] = p["top_p"]
        if "seed" in p:
            body["seed"] = p["seed"]
        if self.config.endpoint == "chat":
            messages = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
            body["messages"] = messages + [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body.update(self.config.extra_body)
        return body

    def _parse(self, payload: bytes) -> Completion:
        data = json.loads(payload.decode("utf-8"))
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.config.endpoint == "chat" else choice["text"]
        if not isinstance(text, str):
            raise ValueError("the answer text is not a string")
        return Completion(text=text, finish_reason=choice.get("finish_reason"))

    def _attempt(self, prompt: str) -> Completion:
        data = json.dumps(self.request_body(prompt)).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        deadline = _Deadline(self.config.timeout)
        opener = urllib.request.build_opener(_RefuseRedirects(), _HTTPHandler(deadline), _HTTPSHandler(deadline))
        try:
            try:
                with opener.open(request, timeout=self.config.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                try:  # read here, still under the deadline
                    body = exc.read(ERROR_BODY_BYTES) if exc.fp is not None else b""
                except (OSError, http.client.HTTPException):
                    body = b""
                finally:
                    exc.close()
                raise _StatusError(exc.code, body, _retry_after(exc.headers)) from None
        except _StatusError:
            raise
        except Exception:
            if deadline.expired:  # whatever the shut-down socket raised, the cause is the deadline
                raise TimeoutError(f"no complete answer within {self.config.timeout}s") from None
            raise
        finally:
            deadline.finish()
        return self._parse(payload)

    def _redact(self, text: str, *, cut: bool = False) -> str:
        """``text`` without the key; with ``cut`` (the text may stop mid-key), a trailing piece of the key
        is removed too."""
        key = self.__api_key
        if not key:
            return text
        text = text.replace(key, REDACTED)
        if cut:
            for size in range(min(len(key) - 1, len(text)), 0, -1):
                if text.endswith(key[:size]):
                    return text[:-size] + REDACTED
        return text

    def _status_message(self, exc: _StatusError) -> str:
        if exc.location is not None or 300 <= exc.status < 400:
            target = self._redact(exc.location or "(no Location header)")[:ERROR_EXCERPT_CHARS]
            return (f"HTTP {exc.status} from {self.url}: the endpoint redirects to {target}; redirects are not "
                    f"followed (the API key would go with them): set blackbox.base_url to the final address")
        text = self._redact(exc.body.decode("utf-8", "replace"), cut=len(exc.body) >= ERROR_BODY_BYTES)
        excerpt = " ".join(text.split())[:ERROR_EXCERPT_CHARS]
        return f"HTTP {exc.status} from {self.url}: {excerpt}"

    def _backoff(self, attempt: int, server_hint: float | None) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * (2**attempt))
        with self._rng_lock:
            delay = cap * (0.5 + 0.5 * self._rng.random())
        if server_hint is not None:
            delay = max(delay, min(server_hint, self.config.backoff_max))
        return delay

    def complete(self, prompt: str) -> Completion:
        """One answer, with retries (see the module docstring)."""
        last = ""
        for attempt in range(self.config.max_retries + 1):
            hint = None
            try:
                completion = self._attempt(prompt)
                return Completion(completion.text, completion.finish_reason, attempts=attempt + 1)
            except _StatusError as exc:
                last = self._status_message(exc)
                if not (exc.status >= 500 or exc.status in RETRY_STATUS) or exc.location is not None:
                    raise BlackBoxError(last, status=exc.status) from None
                hint = exc.retry_after
            except (TimeoutError, socket.timeout) as exc:
                last = f"timed out after {self.config.timeout}s ({self.url}): {exc}"
            except urllib.error.URLError as exc:
                timed_out = isinstance(exc.reason, (TimeoutError, socket.timeout))
                last = f"timed out after {self.config.timeout}s ({self.url})" if timed_out else f"cannot reach {self.url}: {exc.reason}"
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = f"connection to {self.url} failed: {type(exc).__name__}: {exc}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed answer from {self.url}: {type(exc).__name__}: {exc}"
            # exception texts can quote what the server sent (a status line, a body), so the key too
            last = self._redact(last)
            if attempt < self.config.max_retries:
                delay = self._backoff(attempt, hint)
                log.info("teacher request failed (%s); retry %d/%d in %.2fs", last, attempt + 1, self.config.max_retries, delay)
                self._sleep(delay)
        raise BlackBoxError(f"gave up after {self.config.max_retries + 1} attempts: {last}", retryable=True)

    # ------------------------------------------------------------------------------ many prompts
    def key(self, prompt: str) -> str:
        return request_key(prompt, self.teacher_id, self.params())

    def fill_store(
        self,
        prompts: Sequence[str],
        store: ResponseStore,
        *,
        doc_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> StoreReport:
        """Answer every prompt whose key is not in ``store`` yet, ``concurrency`` at a time; each answer
        is stored the moment it arrives. Prompts that fail for good are reported (and raise
        :class:`BlackBoxError` at the end, after every other prompt has been answered and stored)."""
        report = StoreReport()
        todo: dict[str, tuple[str, str | None]] = {}
        for i, prompt in enumerate(prompts):
            key = self.key(prompt)
            if key in store:
                report.already_stored += 1
            elif key not in todo:  # the same prompt twice is asked once
                todo[key] = (prompt, doc_ids[i] if doc_ids is not None else None)
        if not todo:
            return report

        def work(key: str, prompt: str, doc_id: str | None) -> None:
            completion = self.complete(prompt)
            store.add({
                "key": key, "prompt": prompt, "response": completion.text, "finish_reason": completion.finish_reason,
                "teacher": self.teacher_id, "params": self.params(), "doc_id": doc_id, "attempts": completion.attempts,
            })

        done = 0
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="blackbox")
        try:
            futures = {pool.submit(work, key, prompt, doc_id): prompt for key, (prompt, doc_id) in todo.items()}
            for future in as_completed(futures):
                report.requested += 1
                try:
                    future.result()
                except BlackBoxError as exc:
                    report.failed.append((futures[future], str(exc)))
                done += 1
                if progress is not None:
                    progress(done, len(todo))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if report.failed:
            raise BlackBoxError(
                f"{len(report.failed)} of {len(todo)} prompts failed ({report.failed[0][1]}); the other answers are "
                f"saved in {store.path}: rerun to retry only the missing ones"
            )
        return report
