"""Performance-guided active distillation (PGKD, arXiv 2411.05045): hard-example choice, prompts, answer parsing,
and the loop against a scripted teacher behind the real OpenAI-compatible server: budget, early stop, and a run
killed (SIGKILL) while the teacher answers that resumes without asking anything twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmdistill.generation.config import BlackBoxConfig, SamplingConfig
from lmdistill.generation.server import Fault, ModelServer
from lmdistill.generation.store import ResponseStore
from lmdistill.selection.active import (
    ActiveConfig,
    build_prompt,
    parse_examples,
    prompt_examples,
    run_active,
    select_examples,
)
from lmdistill.selection.classify import (
    ClassTaskConfig,
    Labelled,
    StudentClassifier,
    build_class_task,
    class_report,
    load_encoder,
    normalize_text,
)
from lmdistill.selection.scripted import FunctionLM
from tests.conftest import save_tiny_model

LABELS = ["computers", "politics", "science"]


# ------------------------------------------------------------------------------------------ pure parts
def _validation() -> list[Labelled]:
    texts = ["alpha text", "beta text", "gamma text", "delta text", "epsilon text", "zeta text"]
    return [Labelled(t, LABELS[i % 3], f"doc{i}") for i, t in enumerate(texts)]


def test_hard_negatives_are_the_confident_mistakes_dealt_over_queries():
    validation = _validation()  # truth: 0 1 2 0 1 2
    probs = torch.tensor([
        [0.90, 0.05, 0.05],   # 0: right, conf .90
        [0.70, 0.20, 0.10],   # 1: wrong (pred computers) conf .70
        [0.10, 0.85, 0.05],   # 2: wrong (pred politics) conf .85
        [0.20, 0.75, 0.05],   # 3: wrong (pred politics) conf .75
        [0.10, 0.60, 0.30],   # 4: right, conf .60
        [0.05, 0.15, 0.80],   # 5: right, conf .80
    ])
    report = class_report(probs, [LABELS.index(v.label) for v in validation], LABELS)
    assert report.accuracy == pytest.approx(0.5)
    queries = select_examples(report, validation, LABELS, mode="hard", n_queries=2, n_shown=2, n_correct=1, seed=0)
    # wrong examples by confidence: 2 (.85), 3 (.75), 1 (.70); query 0 gets the first two, query 1 the next two (wrapping)
    assert [i for i, _, _ in queries[0]["shown"]] == [2, 3]
    assert [i for i, _, _ in queries[1]["shown"]] == [1, 2]
    assert queries[0]["shown"][0] == (2, "politics", pytest.approx(0.85))
    # right examples of the hard examples' classes (science, computers), most confident first: 0 (computers .90)
    assert [i for i, _, _ in queries[0]["correct"]] == [0]
    assert [i for i, _, _ in select_examples(report, validation, LABELS, mode="hard", n_queries=1, n_shown=2,
                                             n_correct=2, seed=0)[0]["correct"]] == [0, 5]
    # focus: the hard examples' true classes, then the class of lowest F1 (politics: precision 1/3, recall 1/2)
    assert queries[0]["focus"] == ["science", "computers", "politics"]
    random_q = select_examples(report, validation, LABELS, mode="random", n_queries=3, n_shown=4, n_correct=1, seed=7)
    assert random_q == select_examples(report, validation, LABELS, mode="random", n_queries=3, n_shown=4, n_correct=1, seed=7)
    # as many examples per query as a hard query shows (4 + 1), drawn without regard to the student's mistakes
    assert all(len(q["shown"]) == 5 and not q["correct"] and q["focus"] == LABELS for q in random_q)


def test_prompt_shows_the_chosen_examples_and_parsing_keeps_only_new_valid_lines():
    validation = _validation()
    probs = torch.tensor([[0.1, 0.8, 0.1]] * 6)
    report = class_report(probs, [LABELS.index(v.label) for v in validation], LABELS)
    query = select_examples(report, validation, LABELS, mode="hard", n_queries=1, n_shown=3, n_correct=1, seed=0)[0]
    prompt = build_prompt("fortunes", LABELS, report, 0, query, validation, n_examples=5)
    assert "accuracy 0.333" in prompt and "Write 5 new" in prompt and "- politics: 0.33 / 1.00 / 0.50" in prompt
    shown = prompt_examples(prompt)
    assert shown == [(validation[i].label, validation[i].text) for i, _, _ in query["shown"] + query["correct"]]
    answer = "\n".join([
        "Here are examples:",                       # no label: unparsed
        "1. Science: The atom is mostly empty.",    # numbered, label case differs
        "- politics: Vote early, vote often.",
        "cooking: A recipe.",                       # not a label
        "computers: alpha text",                    # a validation text copied back: dropped
        "science: the atom is  mostly empty.",      # duplicate of an accepted one (case, spaces)
        "computers: x",                             # too short
    ])
    exclude = {normalize_text(v.text) for v in validation}
    got, stats = parse_examples(answer, LABELS, origin="teacher:k", exclude=exclude)
    assert [(e.label, e.text) for e in got] == [("science", "The atom is mostly empty."),
                                                ("politics", "Vote early, vote often.")]
    assert stats == {"lines": 7, "accepted": 2, "unknown_label": 1, "duplicate": 3, "unparsed": 1}


# ------------------------------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("encoder") / "lm", small_tokenizer, layers=1, hidden=32, seed=4)


@pytest.fixture(scope="module")
def task_config() -> ClassTaskConfig:
    return ClassTaskConfig(labels=LABELS, seed_per_class=3, validation_per_class=6, test_per_class=6, max_chars=160)


def variant_answer(prompt: str) -> str:
    """The scripted teacher: one new example per example the prompt shows, with that example's true label."""
    return "\n".join(f"{label}: {text[:50]} (variant {len(text)})" for label, text in prompt_examples(prompt))


@pytest.fixture()
def scripted_server(small_tokenizer):
    servers = []

    def start(answer=variant_answer) -> ModelServer:
        server = ModelServer(FunctionLM(small_tokenizer, answer), small_tokenizer, model_name="scripted",
                             max_new_tokens_limit=4096).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _config(out: Path, server: ModelServer, encoder_dir: Path, task: ClassTaskConfig, **active) -> ActiveConfig:
    return ActiveConfig.model_validate({
        "output_dir": str(out),
        "task": task.model_dump(),
        "student": {"encoder": str(encoder_dir), "epochs": 60},
        "teacher": {"blackbox": BlackBoxConfig(base_url=server.base_url, model="scripted", api_key_env=None, concurrency=1,
                                               max_retries=1, backoff_base=0.01).model_dump(),
                    "sampling": SamplingConfig(greedy=True, max_new_tokens=2048).model_dump()},
        "active": {"rounds": 10, "budget": 5, "queries_per_round": 2, "examples_per_query": 4, "hard_per_query": 3,
                   "correct_per_query": 1, "patience": 10, **active},
    })


def _answered(server: ModelServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in server.requests:
        if r["outcome"] == 200:
            counts[r["prompt"]] = counts.get(r["prompt"], 0) + 1
    return counts


def test_loop_spends_the_budget_with_prompts_built_from_hard_examples(tmp_path, scripted_server, encoder_dir, task_config):
    server = scripted_server()
    cfg = _config(tmp_path / "run", server, encoder_dir, task_config)
    encoder = load_encoder(cfg.student)
    summary = run_active(cfg, encoder=encoder)
    # budget 5 at 2 per round: 2 + 2 + 1 queries, then a last evaluation, and a stop for the budget
    assert summary["stopped"] == "budget" and summary["queries_used"] == 5
    assert [r["queries_used"] for r in summary["rounds"]] == [0, 2, 4, 5]
    asked = [r["prompt"] for r in server.requests]
    assert len(asked) == 5 and len(set(asked)) == 5 and all(n == 1 for n in _answered(server).values())
    # round 0's prompts, rebuilt independently: the student on the seed set, its validation mistakes
    task = build_class_task(task_config)
    student = StudentClassifier(cfg.student, task["labels"], encoder=encoder)
    student.fit(task["seed"])
    report = student.evaluate(task["validation"])
    chosen = select_examples(report, task["validation"], task["labels"], mode="hard", n_queries=2, n_shown=3, n_correct=1,
                             seed=_round_seed(cfg, 0))
    assert asked[:2] == [build_prompt("fortunes", task["labels"], report, 0, q, task["validation"], 4) for q in chosen]
    wrong = [i for i, (p, e) in enumerate(zip(report.predictions, task["validation"])) if task["labels"][p] != e.label]
    first_shown = [i for i, _, _ in chosen[0]["shown"]]
    assert first_shown == sorted(wrong, key=lambda i: (-report.confidence[i], i))[:3]
    # every added example is a parsed line of a stored answer, with its store key as origin
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    store = ResponseStore(tmp_path / "run" / "teacher_store.jsonl")
    assert len(store) == 5 and state["pending"] is None
    for example in state["added"]:
        record = store.get(example["origin"].removeprefix("teacher:"))
        assert f"{example['label']}: {example['text']}" in record["response"].splitlines()
    assert summary["rounds"][-1]["train_size"] == 9 + len(state["added"])
    # a rerun of a finished loop asks nothing and returns the same result
    assert run_active(cfg, encoder=encoder) == summary and len(server.requests) == 5


def _round_seed(cfg: ActiveConfig, k: int) -> int:
    from lmdistill.seeds import derived_seed

    return derived_seed(cfg.active.seed, k)


def test_loop_stops_early_on_a_plateau(tmp_path, scripted_server, encoder_dir, task_config):
    server = scripted_server(lambda prompt: "I cannot help with that.")
    cfg = _config(tmp_path / "run", server, encoder_dir, task_config, patience=1, budget=20)
    summary = run_active(cfg, encoder=load_encoder(cfg.student))
    assert summary["stopped"] == "plateau"
    rounds = summary["rounds"]
    assert len(rounds) == 2 and rounds[0]["validation"]["accuracy"] == rounds[1]["validation"]["accuracy"]
    assert rounds[0]["teacher"] == {"queries": 2, "lines": 2, "accepted": 0, "unknown_label": 0, "duplicate": 0, "unparsed": 2}
    assert summary["queries_used"] == 2 and len(server.requests) == 2


CHILD = """
import sys
from lmdistill.selection.active import ActiveConfig, run_active
run_active(ActiveConfig.model_validate_json(sys.argv[1]))
print("finished")
"""


def test_killed_loop_resumes_without_asking_twice(tmp_path, scripted_server, encoder_dir, task_config):
    """The loop runs in a child process killed (SIGKILL) while its 6th query waits in the server, after round 1's
    first two answers were stored; the resumed loop asks only round 1's third query and ends as an uninterrupted one."""
    reference = scripted_server()
    expected = run_active(_config(tmp_path / "reference", reference, encoder_dir, task_config, queries_per_round=3, budget=6))

    server = scripted_server()
    release = threading.Event()
    server.fault = lambda info: Fault(wait=release, status=503) if info.n_total == 6 else None
    cfg = _config(tmp_path / "run", server, encoder_dir, task_config, queries_per_round=3, budget=6)
    store_path = tmp_path / "run" / "teacher_store.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json()], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            stored = len(store_path.read_text().splitlines()) if store_path.exists() else 0
            if stored >= 5 and len(server.requests) >= 6:
                break
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the loop never reached its 6th query")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        release.set()
    out, _ = child.communicate()
    assert b"finished" not in out
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["pending"]["round"] == 1 and state["queries_used"] == 6 and len(ResponseStore(store_path)) == 5
    before = _answered(server)

    server.fault = None
    summary = run_active(cfg, encoder=load_encoder(cfg.student))
    after = _answered(server)
    new = {p: after.get(p, 0) - before.get(p, 0) for p in after}
    assert sum(new.values()) == 1                                   # only the unanswered query, once
    assert all(n == 1 for n in after.values())                      # no prompt answered twice, ever
    # the same rounds as the uninterrupted loop: identical counts and accuracies; losses equal to float rounding
    # (the resumed process embeds texts in other batches, which moves float32 sums in the last digits)
    assert _flat(summary["rounds"]) == pytest.approx(_flat(expected["rounds"]), rel=1e-5)
    assert summary["stopped"] == expected["stopped"] == "budget"
    added = [(e["label"], e["text"]) for e in json.loads((tmp_path / "run" / "state.json").read_text())["added"]]
    assert added == [(e["label"], e["text"]) for e in json.loads((tmp_path / "reference" / "state.json").read_text())["added"]]
    assert len(added) == summary["added"] > 0


def _flat(node, prefix: str = "") -> dict[str, float]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix: node}


@pytest.mark.parametrize("name", ["fortunes", "gcide_pos"])
def test_classification_tasks_are_balanced_disjoint_and_label_free(name):
    cfg = ClassTaskConfig(name=name, seed_per_class=3, validation_per_class=5, test_per_class=5,
                          labels=LABELS if name == "fortunes" else None)
    task = build_class_task(cfg)
    assert task == build_class_task(cfg)                                    # deterministic
    labels = task["labels"]
    assert labels == (LABELS if name == "fortunes" else ["noun", "verb", "adjective", "adverb"])
    for part, n in (("seed", 3), ("validation", 5), ("test", 5)):
        assert [e.label for e in task[part]] == [lab for lab in labels for _ in range(n)]
    origins = [{e.origin for e in task[p]} for p in ("seed", "pool", "validation", "test")]
    assert sum(len(o) for o in origins) == len(set().union(*origins))      # no document in two parts
    texts = [normalize_text(e.text) for p in ("seed", "validation", "test") for e in task[p]]
    assert len(texts) == len(set(texts))
    if name == "gcide_pos":  # the text is the definitions only: the part of speech is not written in it
        assert not any(e.text.startswith(("n.", "v.", "a.", "adv.")) for e in task["test"])
