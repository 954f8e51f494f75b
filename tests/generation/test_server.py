"""`lmdistill serve`'s server (generation/server.py) over real sockets on 127.0.0.1: limits (body size,
key before body, stalled connections, concurrent connections), parameter validation, usage, streaming
and chat templates, against the tiny trained model."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from typing import Any

import pytest

from lmdistill.generation.batching import encode_prompts
from lmdistill.generation.sampling import SamplingParams, generate, strip_eos
from lmdistill.generation.server import ModelServer
from tests.generation.conftest import tiny_gpt2

KEY = "sk-server-test-0123456789"  # a made-up key
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture()
def server(trained_tiny, verse_tokenizer):
    with ModelServer(trained_tiny, verse_tokenizer, model_name="tiny", api_key=KEY, timeout=1.0, max_connections=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def random_tiny(verse_tokenizer):
    """An untrained model: its greedy answers run to max_tokens through arbitrary tokens (bytes that
    are pieces of UTF-8 characters included), where the trained one mostly answers ',' and stops."""
    return tiny_gpt2(verse_tokenizer, seed=3)


@pytest.fixture(params=["trained", "random"])
def any_server(request, trained_tiny, random_tiny, verse_tokenizer):
    model = trained_tiny if request.param == "trained" else random_tiny
    with ModelServer(model, verse_tokenizer, api_key=KEY, timeout=5.0) as srv:
        yield srv, model, request.param


@pytest.fixture(scope="module")
def prompt(continue_task) -> str:
    return continue_task["test"][0].prompt


def port_of(server: Any) -> int:
    return int(server.base_url.split(":")[2].split("/")[0])


def post(server: ModelServer, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, raw body) of one POST; ``body``: bytes as they are, anything else as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **AUTH, **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, raw


def post_json(server: ModelServer, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    status, _, raw = post(server, path, body, **kw)
    return status, json.loads(raw)


def raw_exchange(server: ModelServer, data: bytes, *, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; (everything received until the server closes, seconds taken)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - start


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> dict[str, Any]:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def local_greedy(model, tokenizer, text: str, max_new_tokens: int) -> list[int]:
    ids = encode_prompts(tokenizer, [text])
    return generate(model, ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    params=SamplingParams(greedy=True, max_new_tokens=max_new_tokens), vocab_size=len(tokenizer))[0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- body and key
def test_an_oversized_body_gets_413_before_any_of_it_is_sent(trained_tiny, verse_tokenizer):
    with ModelServer(trained_tiny, verse_tokenizer, api_key=KEY, max_body_bytes=1 << 20, timeout=5.0) as srv:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {50 << 20}\r\n\r\n").encode()
        response, seconds = raw_exchange(srv, head)  # the body never comes: the answer may not wait for it
        assert status_of(response) == 413 and seconds < 4.0
        error = json_of(response)["error"]
        assert error["param"] == "Content-Length" and str(1 << 20) in error["message"]
        assert [(r["outcome"], r["prompt"]) for r in srv.requests] == [(413, None)]


def test_a_wrong_key_is_refused_before_the_body_is_read_and_costs_no_memory(server):
    body = json.dumps({"prompt": "In the beginning " * 250_000, "max_tokens": 4}).encode()  # ~4 MB
    assert len(body) > 4_000_000
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    def rejected() -> tuple[int, float]:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
            sock.sendall(head)
            sender = threading.Thread(target=lambda: _send_quietly(sock, body))
            sender.start()  # like a real client, it keeps sending the body while the answer comes
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            sender.join()
        deadline = time.monotonic() + 10  # the server discards the rest of the body, then frees the connection
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.005)
        return status_of(received), time.monotonic() - start

    for _ in range(5):  # warm up allocator pools before measuring
        assert rejected()[0] == 401
    before = rss_bytes()
    results = [rejected() for _ in range(50)]
    grown = rss_bytes() - before
    assert all(status == 401 for status, _ in results), results
    assert all(r["outcome"] == 401 and r["prompt"] is None for r in server.requests) and len(server.requests) == 55
    assert grown < 40 << 20, f"RSS grew by {grown >> 20} MiB over 50 refused 4 MB requests"


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server closed after answering


# ---------------------------------------------------------------------------------------------- validation
BAD_PARAMETERS = [
    # (case, path, body as JSON text, the param named)
    ("max_tokens above the context", "/v1/completions", '{"prompt": "P", "max_tokens": 100000}', "max_tokens"),
    ("max_tokens above the context, within the server limit", "/v1/completions", '{"prompt": "P", "max_tokens": 200}', "max_tokens"),
    ("max_tokens leaves no room for the prompt", "/v1/completions", '{"prompt": "LONG60", "max_tokens": 120}', "max_tokens"),
    ("max_tokens negative", "/v1/completions", '{"prompt": "P", "max_tokens": -3}', "max_tokens"),
    ("max_tokens zero", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "P"}], "max_tokens": 0}', "max_tokens"),
    ("max_tokens not an integer", "/v1/completions", '{"prompt": "P", "max_tokens": 2.5}', "max_tokens"),
    ("max_tokens a string", "/v1/completions", '{"prompt": "P", "max_tokens": "8"}', "max_tokens"),
    ("max_tokens Infinity", "/v1/completions", '{"prompt": "P", "max_tokens": Infinity}', "max_tokens"),
    ("temperature negative", "/v1/completions", '{"prompt": "P", "temperature": -0.5}', "temperature"),
    ("temperature NaN", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "P"}], "temperature": NaN}', "temperature"),
    ("temperature a string", "/v1/completions", '{"prompt": "P", "temperature": "hot"}', "temperature"),
    ("top_p zero", "/v1/completions", '{"prompt": "P", "top_p": 0}', "top_p"),
    ("top_p negative", "/v1/completions", '{"prompt": "P", "top_p": -0.2}', "top_p"),
    ("top_p above 1", "/v1/completions", '{"prompt": "P", "top_p": 1.5}', "top_p"),
    ("top_p -Infinity", "/v1/completions", '{"prompt": "P", "top_p": -Infinity}', "top_p"),
    ("seed a string", "/v1/completions", '{"prompt": "P", "seed": "x"}', "seed"),
    ("seed too large", "/v1/completions", '{"prompt": "P", "seed": 1e400}', "seed"),
    ("n above 1", "/v1/completions", '{"prompt": "P", "n": 2}', "n"),
    ("stream not a boolean", "/v1/completions", '{"prompt": "P", "stream": "yes"}', "stream"),
    ("messages a number", "/v1/chat/completions", '{"messages": 5}', "messages"),
    ("messages empty", "/v1/chat/completions", '{"messages": []}', "messages"),
    ("a message without content", "/v1/chat/completions", '{"messages": [{"role": "user"}]}', "messages"),
    ("a message content not a string", "/v1/chat/completions", '{"messages": [{"role": "user", "content": 7}]}', "messages"),
    ("no user message", "/v1/chat/completions", '{"messages": [{"role": "system", "content": "P"}]}', "messages"),
    ("prompt missing", "/v1/completions", '{"max_tokens": 4}', "prompt"),
    ("prompt a list", "/v1/completions", '{"prompt": ["P"]}', "prompt"),
    ("prompt longer than the context", "/v1/completions", '{"prompt": "LONG", "max_tokens": 4}', "prompt"),
    ("chat prompt longer than the context", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "LONG"}]}', "messages"),
]


@pytest.mark.parametrize("case,path,body,param", BAD_PARAMETERS, ids=[c[0] for c in BAD_PARAMETERS])
def test_each_bad_parameter_gets_400_naming_it(server, prompt, verse_tokenizer, case, path, body, param):
    long_prompt = " ".join(["In the beginning God created the heaven and the earth."] * 40)
    assert len(verse_tokenizer(long_prompt)["input_ids"]) > server.context
    sixty = " ".join(long_prompt.split()[:200])
    while len(encode_prompts(verse_tokenizer, [sixty])[0]) > 60:  # a prompt of about 60 tokens: fits alone
        sixty = sixty.rsplit(" ", 1)[0]
    text = body.replace('"LONG60"', json.dumps(sixty)).replace('"LONG"', json.dumps(long_prompt)).replace('"P"', json.dumps(prompt))
    status, answer = post_json(server, path, text.encode())
    assert status == 400, answer
    assert answer["error"]["param"] == param and param in answer["error"]["message"], answer
    assert "\n" not in answer["error"]["message"]
    # the connection was answered, not dropped, and the server goes on answering
    status, ok = post_json(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert status == 200 and ok["choices"][0]["text"] is not None


@pytest.mark.parametrize("length,status", [("abc", 400), ("-5", 400), ("12, 13", 400), ("1e3", 400), (None, 411)])
def test_a_bad_content_length_gets_a_clear_4xx(server, length, status):
    header = "" if length is None else f"Content-Length: {length}\r\n"
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n{header}\r\n"
               '{"prompt": "In the beginning"}').encode()
    response, _ = raw_exchange(server, request)
    assert status_of(response) == status
    assert json_of(response)["error"]["param"] == "Content-Length"


def test_invalid_json_and_a_non_object_body_get_400(server):
    for body in (b'{"prompt": "x",', b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        status, answer = post_json(server, "/v1/completions", body)
        assert status == 400 and "JSON" in answer["error"]["message"], (body[:10], answer)


# ---------------------------------------------------------------------------------------------- connections
def test_a_stalled_connection_is_closed_after_the_timeout(server):
    """Half a request's headers, then silence; then a client trickling a byte every 0.3 s (each read
    would beat a per-read timeout): both are closed once `timeout` (1 s) has passed."""
    response, seconds = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert response in (b"",) or status_of(response) == 408
    assert 0.8 <= seconds < 3.0, seconds

    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        closed = False
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.3)
            if time.monotonic() - start > 6:
                break
        if not closed:
            sock.settimeout(3)
            try:
                closed = sock.recv(100) == b""
            except ConnectionResetError:
                closed = True
    assert closed and time.monotonic() - start < 4.0


def test_a_slow_body_gets_408(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    response, seconds = raw_exchange(server, head + b'{"prompt": ')
    assert status_of(response) == 408 and seconds < 3.0


def test_connections_over_the_bound_get_503_at_once(server, prompt):
    """max_connections=4: with 4 connections held open, a fifth is answered 503 (Retry-After) at once;
    once they are gone, requests are served again."""
    held = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) for _ in range(4)]
    try:
        deadline = time.monotonic() + 5
        while server.connections < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections == 4
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) as extra:
            response = b""
            while chunk := extra.recv(65536):
                response += chunk
        assert status_of(response) == 503 and b"Retry-After: 1" in response and time.monotonic() - start < 0.5
        assert "busy" in json_of(response)["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    status, answer = post_json(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert status == 200


def test_a_request_with_expect_100_continue_is_served(server, prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 3, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert status_of(response) == 200


# ---------------------------------------------------------------------------------------------- answers
def test_usage_counts_the_tokenizer_tokens(any_server, continue_task, verse_tokenizer):
    server, model, name = any_server
    eos = verse_tokenizer.eos_token_id
    finishes = set()
    for doc in continue_task["test"][:4]:
        status, answer = post_json(server, "/v1/completions", {"prompt": doc.prompt, "max_tokens": 12, "temperature": 0})
        assert status == 200
        tokens = local_greedy(model, verse_tokenizer, doc.prompt, 12)
        prompt_tokens = len(encode_prompts(verse_tokenizer, [doc.prompt])[0])
        assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                                   "total_tokens": prompt_tokens + len(tokens)}
        assert answer["choices"][0]["text"] == verse_tokenizer.decode(strip_eos(tokens, eos), skip_special_tokens=True)
        finish = "stop" if tokens[-1] == eos else "length"
        assert answer["choices"][0]["finish_reason"] == finish
        finishes.add(finish)
    # the trained model's answers end with an EOS (counted), the random one's are cut at max_tokens
    assert ("stop" if name == "trained" else "length") in finishes


def read_sse(server: ModelServer, path: str, body: dict[str, Any]) -> tuple[dict[str, str], list[Any]]:
    """(headers, the events' data: parsed JSON, or the string '[DONE]')."""
    status, headers, raw = post(server, path, body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return headers, events


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.3, "top_p": 0.95, "seed": 11}])
def test_a_stream_concatenates_to_the_plain_answer(any_server, continue_task, path, sampling):
    server, _, name = any_server
    chat = path.endswith("chat/completions")
    most_pieces = 0
    for doc in continue_task["test"][:4]:
        request: dict[str, Any] = {"max_tokens": 24, **sampling}
        request.update({"messages": [{"role": "user", "content": doc.prompt}]} if chat else {"prompt": doc.prompt})
        status, plain = post_json(server, path, request)
        assert status == 200
        _, events = read_sse(server, path, {**request, "stream": True, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        *chunks, usage_chunk, done = events
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
        assert all(c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks)
        if chat:
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
            expected = plain["choices"][0]["message"]["content"]
        else:
            pieces = [c["choices"][0]["text"] for c in chunks]
            expected = plain["choices"][0]["text"]
        assert "".join(pieces) == expected
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [plain["choices"][0]["finish_reason"]]
        most_pieces = max(most_pieces, len([p for p in pieces if p]))
    # the text really came in pieces (the trained model's greedy answers are a single ',')
    assert most_pieces > 1 or (name == "trained" and sampling["temperature"] == 0)


def test_a_stream_without_usage_ends_with_done(server, prompt):
    _, events = read_sse(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


def test_chat_uses_the_tokenizer_template_when_it_has_one(trained_tiny, saved_teacher, prompt):
    from lmdistill.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(saved_teacher)
    assert not getattr(tokenizer, "chat_template", None)
    messages = [{"role": "system", "content": "Continue the verse."}, {"role": "user", "content": prompt}]
    request = {"messages": messages, "max_tokens": 10, "temperature": 0}

    with ModelServer(trained_tiny, tokenizer) as srv:  # no template: the last user message verbatim
        status, plain = post_json(srv, "/v1/chat/completions", request)
    verbatim = local_greedy(trained_tiny, tokenizer, prompt, 10)
    assert status == 200 and plain["choices"][0]["message"]["content"] == tokenizer.decode(
        strip_eos(verbatim, tokenizer.eos_token_id), skip_special_tokens=True)
    assert plain["usage"]["prompt_tokens"] == len(encode_prompts(tokenizer, [prompt])[0])

    tokenizer.chat_template = TEMPLATE
    rendered = f"system: Continue the verse.\nuser: {prompt}\nassistant:"  # the template, by hand
    with ModelServer(trained_tiny, tokenizer) as srv:
        status, templated = post_json(srv, "/v1/chat/completions", request)
        _, events = read_sse(srv, "/v1/chat/completions", {**request, "stream": True})
    tokens = local_greedy(trained_tiny, tokenizer, rendered, 10)
    expected = tokenizer.decode(strip_eos(tokens, tokenizer.eos_token_id), skip_special_tokens=True)
    assert status == 200 and templated["choices"][0]["message"]["content"] == expected
    assert templated["usage"]["prompt_tokens"] == len(encode_prompts(tokenizer, [rendered])[0])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected


def test_a_template_that_writes_the_bos_does_not_get_a_second_one(trained_tiny, saved_teacher):
    from lmdistill.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(saved_teacher)
    tokenizer.chat_template = "{{ eos_token }}" + TEMPLATE  # EOS doubles as BOS for our tokenizers
    with ModelServer(trained_tiny, tokenizer) as srv:
        ids = srv.prompt_ids(tokenizer.apply_chat_template([{"role": "user", "content": "In the"}], tokenize=False,
                                                           add_generation_prompt=True), templated=True)
    assert ids[0] == tokenizer.eos_token_id and ids[1] != tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- the command
def test_the_serve_command_applies_its_limits(saved_teacher, prompt):
    """`lmdistill serve` with --max-body-bytes / --max-tokens-limit and a key from the environment."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "SERVE_TEST_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    child = subprocess.Popen(
        [sys.executable, "-m", "lmdistill.cli", "serve", str(saved_teacher), "--port", "0", "--api-key-env", "SERVE_TEST_KEY",
         "--max-body-bytes", "2000", "--max-tokens-limit", "5", "--timeout", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, child.poll() is not None and child.stderr.read())

        class Remote:
            base_url = match.group(0)

        remote: Any = Remote()
        status, ok = post_json(remote, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert status == 200 and "usage" in ok, ok
        status, answer = post_json(remote, "/v1/completions", {"prompt": prompt, "max_tokens": 6})
        assert status == 400 and answer["error"]["param"] == "max_tokens" and "5" in answer["error"]["message"]
        status, answer = post_json(remote, "/v1/completions", {"prompt": "x" * 3000})
        assert status == 413 and "2000" in answer["error"]["message"]
        status, answer = post_json(remote, "/v1/completions", {"prompt": prompt}, headers={"Authorization": "Bearer no"})
        assert status == 401
    finally:
        child.terminate()
        child.wait(timeout=30)
