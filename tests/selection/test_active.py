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

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
from lmdistill.selection.robust import robust_sample, robust_selection_probabilities, student_margins
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


# ------------------------------------------------------------------------------------------ robust (RAD) selection
# Robust Active Distillation (Baykal et al., arXiv 2210.01213): the learner samples by p, an adversary makes the
# teacher wrong on up to k points, and the learner earns the gain g = 1 - student margin of a drawn point only when
# the teacher is right. The references below are written from that game, in float64, independently of the module.
def _rad_reference(margins, correct) -> list[float]:
    """The game's solution written out: gains sorted down, value (l - k) / sum_{j<=l} 1/g_j for each l, the largest
    best l, and p proportional to 1/g on those l points (no positive gain: uniform; no positive value: all positive
    gains)."""
    n = len(margins)
    gains = [1.0 - float(m) for m in margins]
    k = sum(1.0 - float(c) for c in correct)
    positive = [i for i in sorted(range(n), key=lambda i: (-gains[i], i)) if gains[i] > 0]
    if not positive:
        return [1.0 / n] * n
    values, total = [], 0.0
    for size, i in enumerate(positive, 1):
        total += 1.0 / gains[i]
        values.append((size - k) / total)
    best = max(values)
    size = max(s for s, v in enumerate(values, 1) if v >= best - 1e-12 * max(1.0, abs(best))) if best > 0 else len(positive)
    norm = sum(1.0 / gains[i] for i in positive[:size])
    out = [0.0] * n
    for i in positive[:size]:
        out[i] = (1.0 / gains[i]) / norm
    return out


def _worst_case(p, gains, k: float) -> float:
    """What p earns against the best adversary: it removes up to k units of the payoffs p_i g_i, at most one
    unit per point, so the largest first."""
    payoffs = sorted((float(a) * float(b) for a, b in zip(p, gains)), reverse=True)
    removed, left = 0.0, k
    for x in payoffs:
        take = min(1.0, max(0.0, left))
        removed += take * x
        left -= take
    return sum(payoffs) - removed


def _game_value_lp(gains, k: float) -> float:
    """The value of the game by linear programming (the adversary's problem dualised): max over p in the simplex,
    t >= 0, u >= 0 of sum g_i p_i - k t - sum u_i subject to g_i p_i - t - u_i <= 0."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    n = len(gains)
    c = np.concatenate([-np.asarray(gains, dtype=np.float64), [k], np.ones(n)])
    a_ub = np.zeros((n, 2 * n + 1))
    for i in range(n):
        a_ub[i, i], a_ub[i, n], a_ub[i, n + 1 + i] = gains[i], -1.0, -1.0
    a_eq = np.concatenate([np.ones(n), [0.0], np.zeros(n)])[None, :]
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (2 * n + 1),
                  method="highs")
    assert res.status == 0, res.message
    return -res.fun


def test_rad_probabilities_on_hand_made_cases():
    # gains .9 .7 .5 .1, k = 4 x .25 = 1: values 0, 1/2.5397, 2/4.5397, 3/14.5397 -> the three largest gains
    p = robust_selection_probabilities([0.1, 0.3, 0.5, 0.9], [0.75] * 4)
    s = 1 / 0.9 + 1 / 0.7 + 1 / 0.5
    assert p.dtype == np.float64
    assert p.tolist() == pytest.approx([1 / 0.9 / s, 1 / 0.7 / s, 1 / 0.5 / s, 0.0], abs=1e-15)
    assert p.tolist() == pytest.approx([0.244755244755, 0.314685314685, 0.440559440559, 0.0], abs=1e-11)
    assert _worst_case(p, [0.9, 0.7, 0.5, 0.1], 1.0) == pytest.approx(2 / s, abs=1e-15)
    # a teacher never wrong (k = 0): margin sampling, the smallest margin takes all, ties share
    assert robust_selection_probabilities([0.2, 0.2, 0.6], [1, 1, 1]).tolist() == [0.5, 0.5, 0.0]
    assert robust_selection_probabilities([0.3, 0.1, 0.6], [1, 1, 1]).tolist() == [0.0, 1.0, 0.0]
    # more expected mistakes spread the mass over more (and less informative) examples
    assert np.count_nonzero(robust_selection_probabilities([0.1, 0.3, 0.5, 0.9], [0.25] * 4)) == 4
    # degenerate: no informative example (uniform); k beyond the informative ones (all of them, by 1/g)
    assert robust_selection_probabilities([1.0, 1.0], [1, 1]).tolist() == [0.5, 0.5]
    assert robust_selection_probabilities([0.5, 1.0, 0.0], [0, 0, 0]).tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert student_margins([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]]).tolist() == pytest.approx([0.5, 0.0, 1.0])
    with pytest.raises(ValueError):
        robust_selection_probabilities([0.1, 1.5], [1, 1])
    with pytest.raises(ValueError):
        robust_selection_probabilities([0.1, 0.5], [1])


@st.composite
def _rad_inputs(draw):
    n = draw(st.integers(1, 8))
    unit = st.floats(0, 1, allow_nan=False)
    margins = draw(st.lists(unit | st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n))
    correct = draw(st.lists(unit | st.sampled_from([0.0, 0.5, 0.9, 1.0]), min_size=n, max_size=n))
    return margins, correct


@settings(max_examples=150, deadline=None)
@given(_rad_inputs(), st.data())
def test_rad_probabilities_solve_the_game(inputs, data):
    margins, correct = inputs
    p = robust_selection_probabilities(margins, correct)
    gains = [1.0 - m for m in margins]
    k = sum(1.0 - c for c in correct)
    assert p.tolist() == pytest.approx(_rad_reference(margins, correct), abs=1e-12)
    assert (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)
    # optimal: its worst case is the game's value (solved as an LP, not by the closed form), and no other
    # distribution does better against its own worst adversary
    value = _worst_case(p, gains, k)
    if any(g > 0 for g in gains):
        assert value == pytest.approx(_game_value_lp(gains, k), abs=1e-6)
    other = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=len(p), max_size=len(p))), dtype=np.float64)
    if other.sum() > 0:
        assert _worst_case(other / other.sum(), gains, k) <= value + 1e-9
    support = p > 0
    if any(g > 0 for g in gains):
        g = np.asarray(gains)
        # the support is the most informative examples, and on it p g is the same (nothing for the adversary to pick)
        assert not (~support).any() or g[support].min() >= g[~support].max()
        assert np.allclose(p[support] * g[support], (p[support] * g[support])[0], rtol=1e-9)
        # on the support a more informative example gets less mass (p ~ 1/g): not monotone in informativeness
        order = np.argsort(-g[support], kind="stable")
        assert (np.diff(p[support][order]) >= -1e-12).all()
        if k < np.count_nonzero(g > 0):
            assert support.sum() > k
    # correctness enters through the expected number of mistakes only (the adversary decides where they fall)
    assert robust_selection_probabilities(margins, correct[::-1]).tolist() == pytest.approx(p.tolist(), abs=1e-12)
    # monotone in correctness: a teacher less often right never narrows the support nor raises the value ...
    j = data.draw(st.integers(0, len(p) - 1))
    lower = list(correct)
    lower[j] = correct[j] * data.draw(st.floats(0, 1))
    p_lower = robust_selection_probabilities(margins, lower)
    k_lower = sum(1.0 - c for c in lower)
    if any(g > 0 for g in gains):
        assert np.count_nonzero(p_lower) >= support.sum()
    assert _worst_case(p_lower, gains, k_lower) <= value + 1e-12
    # ... and in informativeness: a smaller margin (larger gain) never lowers the value
    sharper = list(margins)
    sharper[j] = margins[j] * data.draw(st.floats(0, 1))
    p_sharper = robust_selection_probabilities(sharper, correct)
    assert _worst_case(p_sharper, [1.0 - m for m in sharper], k) >= value - 1e-12


def _robust_case():
    validation = _validation()  # truth: 0 1 2 0 1 2
    probs = torch.tensor([
        [0.90, 0.05, 0.05],   # 0: margin .85 (gain .15)
        [0.70, 0.20, 0.10],   # 1: margin .50 (gain .50)
        [0.10, 0.85, 0.05],   # 2: margin .80 (gain .20)
        [0.20, 0.75, 0.05],   # 3: margin .55 (gain .45)
        [0.10, 0.60, 0.30],   # 4: margin .30 (gain .70)
        [0.05, 0.15, 0.80],   # 5: margin .65 (gain .35)
    ])
    return validation, probs, class_report(probs, [LABELS.index(v.label) for v in validation], LABELS)


def test_robust_selection_draws_distinct_examples_from_rad_deterministically():
    validation, probs, report = _robust_case()
    margins = [0.85, 0.50, 0.80, 0.55, 0.30, 0.65]
    expected = _rad_reference(margins, [0.75] * 6)  # k = 1.5: values (l - k) / S_l peak at l = 4: gains .7 .5 .45 .35
    assert [i for i, q in enumerate(expected) if q > 0] == [1, 3, 4, 5]

    def pick(**kw):
        args = {"mode": "robust", "n_queries": 3, "n_shown": 2, "n_correct": 1, "seed": 5, "probabilities": probs,
                "teacher_accuracy": 0.75, **kw}
        return select_examples(report, validation, LABELS, **args)

    queries = pick()
    assert queries == pick()                                        # deterministic for a seed
    for q in queries:
        shown = [i for i, _, _ in q["shown"]]
        assert len(shown) == 3 == len(set(shown)) and q["correct"] == [] and q["kind"] == "robust"
        assert set(shown) <= {1, 3, 4, 5}                           # three draws from a support of four
        assert q["focus"] == list(dict.fromkeys([validation[i].label for i in shown] + ["politics"]))
        assert all(p == LABELS[report.predictions[i]] and c == pytest.approx(report.confidence[i]) for i, p, c in q["shown"])
    # beyond the support, the rest follow by decreasing gain: 2 (.20), then 0 (.15); never twice in a query
    for q in pick(n_shown=5, n_correct=1, n_queries=4) + pick(n_shown=9, n_correct=3, n_queries=2):
        shown = [i for i, _, _ in q["shown"]]
        assert len(shown) == 6 and sorted(shown[:4]) == [1, 3, 4, 5] and shown[4:] == [2, 0]
    assert len(pick(n_shown=4, n_correct=0, n_queries=2)[0]["shown"]) == 4
    # single draws follow RAD's distribution
    singles = pick(n_shown=1, n_correct=0, n_queries=3000)
    counts = np.bincount([q["shown"][0][0] for q in singles], minlength=6) / 3000
    assert counts.tolist() == pytest.approx(expected, abs=0.04)
    assert pick(seed=6) != queries or pick(seed=7) != queries
    # a teacher assumed always right: margin sampling (the smallest margin first)
    assert [i for i, _, _ in pick(teacher_accuracy=1.0, n_shown=3, n_correct=0)[0]["shown"]] == [4, 1, 3]
    with pytest.raises(ValueError, match="probabilities"):
        select_examples(report, validation, LABELS, mode="robust", n_queries=1, n_shown=2, n_correct=0, seed=0)
    # the prompt says what the examples are, and a scripted teacher reads them back
    prompt = build_prompt("fortunes", LABELS, report, 0, queries[0], validation, n_examples=4)
    assert "least sure about" in prompt and "wrong with high confidence" not in prompt
    assert prompt_examples(prompt) == [(validation[i].label, validation[i].text) for i, _, _ in queries[0]["shown"]]
    assert robust_sample([0.0, 0.5, 0.5], [0.9, 0.1, 0.2], 0, seed=1) == []


def test_loop_with_robust_selection_spends_the_budget(tmp_path, scripted_server, encoder_dir, task_config):
    from lmdistill.errors import ConfigError
    from lmdistill.selection.active import _load_state

    server = scripted_server()
    cfg = _config(tmp_path / "run", server, encoder_dir, task_config, selection="robust")
    encoder = load_encoder(cfg.student)
    summary = run_active(cfg, encoder=encoder)
    assert summary["selection"] == "robust"
    assert summary["stopped"] == "budget" and summary["queries_used"] == 5
    assert [r["queries_used"] for r in summary["rounds"]] == [0, 2, 4, 5]
    asked = [r["prompt"] for r in server.requests]
    assert len(asked) == 5 and len(set(asked)) == 5 and all(n == 1 for n in _answered(server).values())
    # round 0's prompts, rebuilt independently from the student on the seed set and its validation probabilities
    task = build_class_task(task_config)
    student = StudentClassifier(cfg.student, task["labels"], encoder=encoder)
    student.fit(task["seed"])
    report = student.evaluate(task["validation"])
    probs = student.probabilities([e.text for e in task["validation"]])
    chosen = select_examples(report, task["validation"], task["labels"], mode="robust", n_queries=2, n_shown=3,
                             n_correct=1, seed=_round_seed(cfg, 0), probabilities=probs, teacher_accuracy=0.9)
    assert asked[:2] == [build_prompt("fortunes", task["labels"], report, 0, q, task["validation"], 4) for q in chosen]
    rad = robust_selection_probabilities(student_margins(probs), [0.9] * len(task["validation"]))
    for q in chosen:
        shown = [i for i, _, _ in q["shown"]]
        assert len(shown) == 4 == len(set(shown)) and all(rad[i] > 0 for i in shown[: np.count_nonzero(rad)])
    # store and budget mechanics as with hard selection
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    store = ResponseStore(tmp_path / "run" / "teacher_store.jsonl")
    assert len(store) == 5 and state["pending"] is None and state["settings"]["teacher_accuracy"] == 0.9
    for example in state["added"]:
        record = store.get(example["origin"].removeprefix("teacher:"))
        assert f"{example['label']}: {example['text']}" in record["response"].splitlines()
    assert summary["rounds"][-1]["train_size"] == 9 + len(state["added"]) and summary["added"] == len(state["added"]) > 0
    assert run_active(cfg, encoder=encoder) == summary and len(server.requests) == 5
    # a resume with another assumed teacher accuracy is refused (the selection would differ)
    other = _config(tmp_path / "run", server, encoder_dir, task_config, selection="robust", teacher_accuracy=0.5)
    with pytest.raises(ConfigError, match="other settings"):
        _load_state(tmp_path / "run" / "state.json", other)
