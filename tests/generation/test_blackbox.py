"""The black-box teacher client against a real OpenAI-compatible server on 127.0.0.1 serving a tiny model:
success, retries on 500 and on timeouts, give-up and resume, secrets, and resume after SIGKILL with no
duplicate requests (counted server-side)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmdistill.errors import ConfigError
from lmdistill.generation.batching import encode_prompts
from lmdistill.generation.blackbox import BlackBoxError, BlackBoxTeacher
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig
from lmdistill.generation.sampling import SamplingParams, generate, strip_eos
from lmdistill.generation.server import Fault, ModelServer
from lmdistill.generation.store import ResponseStore

KEY = "sk-test-0123456789abcdef"  # a made-up key for the local test server
ENV = {"LMDISTILL_TEST_KEY": KEY}
GREEDY = SamplingConfig(greedy=True, max_new_tokens=8)


@pytest.fixture()
def server(trained_tiny, verse_tokenizer):
    with ModelServer(trained_tiny, verse_tokenizer, model_name="tiny", api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def prompts(continue_task):
    return [d.prompt for d in continue_task["test"][:8]]


def config(server, **kw) -> BlackBoxConfig:
    base = dict(base_url=server.base_url, model="tiny", api_key_env="LMDISTILL_TEST_KEY", concurrency=3,
                timeout=10.0, max_retries=3, backoff_base=0.01, backoff_max=5.0)
    return BlackBoxConfig(**{**base, **kw})


def local_answers(model, tokenizer, prompts, max_new_tokens=8) -> list[str]:
    ids = encode_prompts(tokenizer, prompts)
    out = generate(model, ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   params=SamplingParams(greedy=True, max_new_tokens=max_new_tokens))
    return [tokenizer.decode(strip_eos(o, tokenizer.eos_token_id), skip_special_tokens=True) for o in out]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_answers_arrive_once_each_and_match_the_model(server, prompts, tmp_path, trained_tiny, verse_tokenizer, endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    store = ResponseStore(tmp_path / "answers.jsonl")
    client = BlackBoxTeacher(config(server, endpoint=endpoint), sampling=GREEDY, environ=ENV)
    report = client.fill_store(prompts + prompts[:3], store)  # repeated prompts are asked once
    assert report.requested == len(prompts) and report.already_stored == 0
    expected = dict(zip(prompts, local_answers(trained_tiny, verse_tokenizer, prompts)))
    assert {r["prompt"]: r["response"] for r in store.records()} == expected
    assert all(server.count(p) == 1 for p in prompts)
    assert all(r["outcome"] == 200 for r in server.requests)
    # the key went over the wire, and nowhere else
    text = (tmp_path / "answers.jsonl").read_text()
    assert KEY not in text and KEY not in repr(client) and KEY not in caplog.text
    assert len(text.splitlines()) == len(prompts)
    # a second run asks for nothing
    again = BlackBoxTeacher(config(server, endpoint=endpoint), sampling=GREEDY, environ=ENV).fill_store(prompts, ResponseStore(tmp_path / "answers.jsonl"))
    assert again.requested == 0 and again.already_stored == len(prompts)
    assert len(server.requests) == len(prompts)


def test_retries_http_500_with_growing_backoff(server, prompts, tmp_path):
    flaky = prompts[0]
    server.fault = lambda info: Fault(status=500) if info.prompt == flaky and info.n_for_prompt <= 2 else None
    sleeps: list[float] = []
    client = BlackBoxTeacher(config(server, backoff_base=1.0, backoff_max=30.0), sampling=GREEDY, environ=ENV,
                             sleep=sleeps.append)
    completion = client.complete(flaky)
    assert completion.attempts == 3 and server.count(flaky) == 3
    assert [r["outcome"] for r in server.requests] == [500, 500, 200]
    # waits within [cap/2, cap] for caps 1, 2 (doubling)
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_retry_after_header_is_honoured(server, prompts):
    server.fault = lambda info: Fault(status=429, retry_after=2.5) if info.n_for_prompt == 1 else None
    sleeps: list[float] = []
    client = BlackBoxTeacher(config(server), sampling=GREEDY, environ=ENV, sleep=sleeps.append)
    client.complete(prompts[1])
    assert sleeps and sleeps[0] >= 2.5 and server.count(prompts[1]) == 2


def test_retries_a_request_that_times_out(server, prompts):
    slow = prompts[2]
    server.fault = lambda info: Fault(delay=1.5) if info.prompt == slow and info.n_for_prompt == 1 else None
    client = BlackBoxTeacher(config(server, timeout=0.4), sampling=GREEDY, environ=ENV, sleep=lambda s: None)
    start = time.perf_counter()
    completion = client.complete(slow)
    assert completion.attempts == 2 and server.count(slow) == 2
    assert time.perf_counter() - start < 1.4  # the client did not wait for the stalled answer


def test_gives_up_keeps_other_answers_and_a_rerun_asks_only_for_the_missing_one(server, prompts, tmp_path):
    broken = prompts[3]
    server.fault = lambda info: Fault(status=503) if info.prompt == broken else None
    store = ResponseStore(tmp_path / "s.jsonl")
    client = BlackBoxTeacher(config(server, max_retries=2), sampling=GREEDY, environ=ENV, sleep=lambda s: None)
    with pytest.raises(BlackBoxError, match="1 of 8 prompts failed"):
        client.fill_store(prompts, store)
    assert server.count(broken) == 3 and len(store) == 7 and client.key(broken) not in store
    server.fault = None
    report = client.fill_store(prompts, ResponseStore(tmp_path / "s.jsonl"))
    assert report.requested == 1 and report.already_stored == 7
    assert server.count(broken) == 4 and all(server.count(p) == 1 for p in prompts if p != broken)


def test_client_errors_fail_at_once_without_leaking_the_key(server, prompts):
    client = BlackBoxTeacher(config(server), sampling=GREEDY, environ={"LMDISTILL_TEST_KEY": "sk-wrong-key-42"},
                             sleep=lambda s: None)
    with pytest.raises(BlackBoxError) as info:
        client.complete(prompts[0])
    # refused at once, and the server did not read the body of a request with a wrong key
    assert info.value.status == 401 and [(r["outcome"], r["prompt"]) for r in server.requests] == [(401, None)]
    assert "sk-wrong-key-42" not in str(info.value)
    with pytest.raises(ConfigError, match="LMDISTILL_TEST_KEY"):
        BlackBoxTeacher(config(server), environ={})


def test_store_drops_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"key": "a", "response": "x"}) + "\n" + '{"key": "b", "resp', encoding="utf-8")
    store = ResponseStore(path)
    assert store.dropped_partial_line and "a" in store and "b" not in store
    store.add({"key": "b", "response": "y"})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]
    assert not store.add({"key": "a", "response": "again"})  # never twice
    assert len(ResponseStore(path)) == 2


CHILD = """
import json, sys
from lmdistill.generation.blackbox import BlackBoxTeacher
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig
from lmdistill.generation.store import ResponseStore
cfg = BlackBoxConfig.model_validate_json(sys.argv[1])
BlackBoxTeacher(cfg, sampling=SamplingConfig(greedy=True, max_new_tokens=8)).fill_store(json.loads(sys.argv[2]), ResponseStore(sys.argv[3]))
print("finished")
"""


def test_resume_after_sigkill_sends_no_duplicate_requests(server, prompts, tmp_path):
    """A client process is killed (SIGKILL) after 3 answers are stored while 2 more requests are in
    flight; the resumed run requests every prompt missing from the store once, and no stored one again."""
    release = threading.Event()
    server.fault = lambda info: Fault(wait=release) if info.n_total > 3 else None
    path = tmp_path / "answers.jsonl"
    cfg = config(server, concurrency=2)
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json(), json.dumps(prompts), str(path)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            stored = len(path.read_text().splitlines()) if path.exists() else 0
            if stored >= 3 and len(server.requests) >= 5:  # 3 answered, 2 waiting in the server
                break
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the client never got 3 answers")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        release.set()
    out, err = child.communicate()
    assert b"finished" not in out and KEY.encode() not in err
    before = {p: server.count(p) for p in prompts}
    stored_before = {r["prompt"] for r in ResponseStore(path).records()}
    assert len(stored_before) == 3 and sum(before.values()) == 5

    server.fault = None
    report = BlackBoxTeacher(cfg, sampling=GREEDY, environ=ENV).fill_store(prompts, ResponseStore(path))
    assert report.already_stored == 3 and report.requested == 5
    for p in prompts:
        new_requests = server.count(p) - before[p]
        assert new_requests == (0 if p in stored_before else 1), p
    final = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["prompt"] for r in final) == sorted(prompts)  # each answer exactly once
    assert KEY not in path.read_text()
