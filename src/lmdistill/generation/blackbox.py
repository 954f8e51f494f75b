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
- **a request timeout** (``timeout`` seconds per attempt);
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

from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig
from lmdistill.generation.store import ResponseStore, request_key

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429})


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
        with urllib.request.urlopen(request, timeout=self.config.timeout) as response:  # noqa: S310 (http(s) only)
            payload = response.read()
        return self._parse(payload)

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
            except urllib.error.HTTPError as exc:
                status = exc.code
                try:
                    body = exc.read(300).decode("utf-8", "replace") if exc.fp is not None else ""
                except OSError:
                    body = ""
                last = f"HTTP {status} from {self.url}: {body.strip()[:200]}"
                if not (status >= 500 or status in RETRY_STATUS):
                    raise BlackBoxError(last, status=status) from None
                hint = _retry_after(exc.headers)
            except (TimeoutError, socket.timeout) as exc:
                last = f"timed out after {self.config.timeout}s ({self.url}): {exc}"
            except urllib.error.URLError as exc:
                last = f"cannot reach {self.url}: {exc.reason}"
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = f"connection to {self.url} failed: {type(exc).__name__}: {exc}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed answer from {self.url}: {type(exc).__name__}: {exc}"
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
