"""Performance-guided active distillation: a teacher writes labelled examples where the student fails.

Di Palo, Singhi and Fadlallah, "Performance-Guided LLM Knowledge Distillation for Efficient Text Classification at
Scale" (PGKD), arXiv 2411.05045 (EMNLP 2024). The loop, round after round:

1. train the student classifier on the labelled data so far (:class:`~lmdistill.selection.classify.StudentClassifier`);
2. evaluate it on the validation set: accuracy, macro F1, per-class precision / recall / F1;
3. stop early when validation accuracy has plateaued (no gain of ``min_delta`` over the best for ``patience``
   rounds), when the teacher-query budget is spent, or after ``rounds`` teacher rounds;
4. choose the examples that condition the teacher: the *hard negatives* (validation examples the student gets wrong,
   most confident first), spread over the round's queries, each query with a few confidently right examples of the
   same classes; ``selection: random`` instead draws them uniformly (the baseline of the same budget);
   ``selection: robust`` draws them by Robust Active Distillation (Baykal et al., arXiv 2210.01213;
   :mod:`~lmdistill.selection.robust`): examples near the student's decision boundary (small top-2 margin),
   spread so that a teacher wrong on some of them (``teacher_accuracy``) cannot spoil the round;
5. ask the teacher, one query per prompt (:func:`build_prompt`: the task, the labels, the validation report, the
   chosen examples with their true label, the student's prediction and confidence, and the classes to focus on),
   for new examples written one per line as ``label: text``;
6. parse the answers (:func:`parse_examples`: unknown labels, empty texts, duplicates and copies of validation or test
   texts are dropped), add them to the training data, and go back to 1.

Teachers: any OpenAI-compatible endpoint through :class:`~lmdistill.generation.blackbox.BlackBoxTeacher` (retries,
backoff, timeouts, the key from the environment), or a local causal LM (``teacher.local``). Every query and answer
goes to a :class:`~lmdistill.generation.store.ResponseStore` the moment it arrives.

Resumable: ``state.json`` (rounds done, their reports, the examples added, the queries spent and the pending
queries of the current round) is replaced atomically after each stage. A round's prompts are written to the state
*before* any is sent, and the budget is charged then, so a run killed while the teacher answers continues with the
same prompts, and requests only those the store has no answer for: a crash loses no answer and pays no request
twice. Rerunning a finished loop returns its result.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmdistill.config import Section, require_existing
from lmdistill.errors import ConfigError
from lmdistill.generation.blackbox import BlackBoxTeacher
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig
from lmdistill.generation.store import ResponseStore, request_key
from lmdistill.seeds import derived_seed
from lmdistill.selection.classify import (
    ClassReport,
    ClassTaskConfig,
    Labelled,
    StudentClassifier,
    StudentConfig,
    build_class_task,
    label_counts,
    normalize_text,
)
from lmdistill.selection.robust import robust_sample, robust_selection_probabilities, student_margins
from lmdistill.train.checkpoint import write_text_atomic

log = logging.getLogger(__name__)

STATE_FORMAT = 1
TASK_DESCRIPTIONS = {
    "fortunes": "which fortune-cookie file a fortune comes from (each file is a topic)",
    "gcide_pos": "the part of speech of an English headword, given only its dictionary definitions",
}
PROMPT_TEXT_CHARS = 240  # an example's text in a prompt is cut to this many characters


class TeacherSettings(Section):
    """Exactly one of ``blackbox`` (an OpenAI-compatible endpoint) or ``local`` (a causal LM directory)."""

    blackbox: BlackBoxConfig | None = None
    local: str | None = Field(None, description="a local causal LM directory (save_pretrained) that writes the examples")
    store: str | None = Field(None, description="the JSONL store of queries and answers; default OUTPUT_DIR/teacher_store.jsonl")
    sampling: SamplingConfig = SamplingConfig(greedy=True, max_new_tokens=512)
    seed: int = 0

    @model_validator(mode="after")
    def _one(self) -> TeacherSettings:
        if (self.blackbox is None) == (self.local is None):
            raise ValueError("teacher: give exactly one of 'blackbox' (an endpoint) or 'local' (a model directory)")
        require_existing(self.local, "teacher.local")
        return self


class ActiveSettings(Section):
    rounds: int = Field(5, ge=1, description="at most this many teacher rounds")
    budget: int = Field(20, ge=1, description="teacher queries in total, all rounds together")
    queries_per_round: int = Field(4, ge=1)
    examples_per_query: int = Field(8, ge=1, description="new examples asked of the teacher per query")
    hard_per_query: int = Field(4, ge=1, description="examples shown per query (hard negatives; random and robust "
                                "selection show this plus correct_per_query)")
    correct_per_query: int = Field(2, ge=0, description="confidently right examples shown per query (hard selection)")
    selection: Literal["hard", "random", "robust"] = Field(
        "hard", description="hard: PGKD's hard negatives; random: the baseline; robust: Robust Active Distillation "
        "(arXiv 2210.01213): small-margin examples, spread against teacher mistakes")
    teacher_accuracy: float = Field(
        0.9, gt=0, le=1, description="robust selection: the assumed share of examples the teacher handles correctly "
        "(no teacher scores exist here); RAD's budget of teacher mistakes is (1 - this) x validation size")
    patience: int = Field(2, ge=1, description="rounds without a validation-accuracy gain of min_delta before stopping")
    min_delta: float = Field(0.005, ge=0)
    seed: int = 0


class ActiveConfig(Section):
    """``lmdistill active-distill CONFIG`` (see ``configs/datacentric/pgkd_fortunes.yaml``)."""

    output_dir: str = "runs/pgkd"
    task: ClassTaskConfig = ClassTaskConfig()
    student: StudentConfig = StudentConfig()
    teacher: TeacherSettings
    active: ActiveSettings = ActiveSettings()


# ------------------------------------------------------------------------------------------- selection
def select_examples(report: ClassReport, validation: Sequence[Labelled], labels: Sequence[str], *, mode: str,
                    n_queries: int, n_shown: int, n_correct: int, seed: int, probabilities: Any = None,
                    teacher_accuracy: float = 0.9) -> list[dict[str, Any]]:
    """What each of the round's ``n_queries`` prompts shows: ``{"shown": [(index, predicted, confidence)], "correct":
    [...], "focus": [labels]}`` with indices into ``validation`` (robust queries also carry ``"kind": "robust"``).

    ``hard``: the wrongly classified examples, most confident first, dealt out in turn (query j gets the j-th block
    of ``n_shown``; with fewer than needed they repeat across queries, never within one); each query also shows up
    to ``n_correct`` of the most confidently right examples of its hard examples' classes; its focus is those
    classes and then the class of lowest F1. ``random``: as many examples as a hard query shows (``n_shown +
    n_correct``) drawn uniformly per query (seeded), every class in focus. ``robust``: as many examples, drawn per
    query (seeded, without replacement) from RAD's distribution
    (:func:`~lmdistill.selection.robust.robust_selection_probabilities`) over the student's top-2 margins, which
    ``probabilities`` (the student's class probabilities on ``validation``, examples x labels) give; focus: their
    classes, then the class of lowest F1. RAD also needs the probability that the teacher is right on each
    example, and no teacher score exists in this loop: the examples are shown with their gold label, so the label
    itself is right, and what stays uncertain is the teacher's own error rate when it writes from them, unknown per
    example; so every example gets ``teacher_accuracy`` (ASSUMPTION: one prior for all; the student's agreement
    with the gold label is a student signal, not a teacher one, and is not used)."""
    truth = [list(labels).index(e.label) for e in validation]
    pred, conf = report.predictions, report.confidence
    queries: list[dict[str, Any]] = []
    if mode == "random":
        for j in range(n_queries):
            rng = random.Random(derived_seed(seed, j, "random-selection"))
            idx = rng.sample(range(len(validation)), min(n_shown + n_correct, len(validation)))
            queries.append({"shown": [(i, None, None) for i in idx], "correct": [], "focus": list(labels)})
        return queries
    worst = min(labels, key=lambda lab: (report.per_class[lab]["f1"], list(labels).index(lab)))
    if mode == "robust":
        if probabilities is None:
            raise ValueError("selection 'robust' needs the student's class probabilities on the validation set")
        margins = student_margins(probabilities)
        if margins.shape[0] != len(validation):
            raise ValueError(f"probabilities: {margins.shape[0]} rows for {len(validation)} validation examples")
        p = robust_selection_probabilities(margins, [teacher_accuracy] * len(validation))
        for j in range(n_queries):
            shown = robust_sample(p, 1.0 - margins, n_shown + n_correct, derived_seed(seed, j, "robust-selection"))
            focus = list(dict.fromkeys([validation[i].label for i in shown] + [worst]))
            queries.append({"shown": [(i, labels[pred[i]], conf[i]) for i in shown], "correct": [], "focus": focus,
                            "kind": "robust"})
        return queries
    wrong = sorted((i for i in range(len(truth)) if pred[i] != truth[i]), key=lambda i: (-conf[i], i))
    right = sorted((i for i in range(len(truth)) if pred[i] == truth[i]), key=lambda i: (-conf[i], i))
    for j in range(n_queries):
        shown: list[int] = []
        for k in range(min(n_shown, len(wrong))):
            i = wrong[(j * n_shown + k) % len(wrong)]
            if i not in shown:
                shown.append(i)
        hard_labels = list(dict.fromkeys(validation[i].label for i in shown))
        focus = list(dict.fromkeys(hard_labels + [worst]))
        correct = [i for i in right if validation[i].label in hard_labels or not shown][:n_correct]
        queries.append({"shown": [(i, labels[pred[i]], conf[i]) for i in shown],
                        "correct": [(i, labels[pred[i]], conf[i]) for i in correct], "focus": focus})
    return queries


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PROMPT_TEXT_CHARS else flat[: PROMPT_TEXT_CHARS - 3] + "..."


def build_prompt(task: str, labels: Sequence[str], report: ClassReport, round_index: int, query: Mapping[str, Any],
                 validation: Sequence[Labelled], n_examples: int) -> str:
    """The text of one teacher query (see the module docstring); deterministic in its inputs."""
    lines = [
        "You write labelled training examples for a text classifier.",
        f"Task: {TASK_DESCRIPTIONS.get(task, task)}.",
        f"Labels: {', '.join(labels)}.",
        "",
        f"The classifier after round {round_index} (validation set): accuracy {report.accuracy:.3f}, "
        f"macro F1 {report.macro_f1:.3f}.",
        "Per label (precision / recall / F1):",
    ]
    lines += [f"- {lab}: {m['precision']:.2f} / {m['recall']:.2f} / {m['f1']:.2f}" for lab, m in report.per_class.items()]
    if query["shown"] and query["shown"][0][1] is not None:
        lines += ["", "Examples it is least sure about (right or wrong):" if query.get("kind") == "robust"
                  else "Examples it got wrong with high confidence:"]
        lines += [f"{n}. true label: {validation[i].label} | predicted: {p} (confidence {c:.2f}) | text: "
                  f"{_one_line(validation[i].text)}" for n, (i, p, c) in enumerate(query["shown"], 1)]
    elif query["shown"]:
        lines += ["", "Examples (chosen at random):"]
        lines += [f"{n}. label: {validation[i].label} | text: {_one_line(validation[i].text)}"
                  for n, (i, _, _) in enumerate(query["shown"], 1)]
    if query["correct"]:
        lines += ["", "Examples it got right:"]
        lines += [f"{n}. label: {validation[i].label} | text: {_one_line(validation[i].text)}"
                  for n, (i, _, _) in enumerate(query["correct"], 1)]
    lines += [
        "",
        f"Write {n_examples} new, varied examples that would teach it the difference, mostly for the labels "
        f"{', '.join(query['focus'])}. Do not copy the examples above.",
        "Answer with one example per line, as `label: text`, using only the labels listed; write nothing else.",
    ]
    return "\n".join(lines)


_SHOWN = re.compile(r"^\d+\. (?:true )?label: (?P<label>[^|]+?) \|(?: predicted: [^|]+\|)? text: (?P<text>.*)$")


def prompt_examples(prompt: str) -> list[tuple[str, str]]:
    """(label, text) of every example a prompt built by :func:`build_prompt` shows (what a scripted teacher reads)."""
    return [(m.group("label"), m.group("text")) for line in prompt.splitlines() if (m := _SHOWN.match(line))]


_ANSWER = re.compile(r"^\s*(?:[-*•]|\d+[.)])?\s*(?P<label>[A-Za-z][\w .\-]*?)\s*:\s*(?P<text>\S.*?)\s*$")


def parse_examples(answer: str, labels: Sequence[str], *, origin: str, exclude: set[str]) -> tuple[list[Labelled], dict[str, int]]:
    """The ``label: text`` lines of a teacher answer whose label is one of ``labels`` (case and surrounding
    punctuation ignored) and whose text is new (not in ``exclude``: the training, validation and test texts, and
    earlier accepted ones, which are added to it). Returns the examples and counts of what was dropped."""
    by_fold = {lab.casefold(): lab for lab in labels}
    stats = {"lines": 0, "accepted": 0, "unknown_label": 0, "duplicate": 0, "unparsed": 0}
    out = []
    for line in answer.splitlines():
        if not line.strip():
            continue
        stats["lines"] += 1
        m = _ANSWER.match(line)
        if m is None:
            stats["unparsed"] += 1
            continue
        label = by_fold.get(m.group("label").strip("`*_ ").casefold())
        text = m.group("text").strip("` ")
        if label is None:
            stats["unknown_label"] += 1
            continue
        key = normalize_text(text)
        if len(key) < 3 or key in exclude:
            stats["duplicate"] += 1
            continue
        exclude.add(key)
        out.append(Labelled(text, label, origin))
        stats["accepted"] += 1
    return out, stats


# ------------------------------------------------------------------------------------------- the teacher
class QueryTeacher:
    """One interface over both teacher kinds: ``answers(prompts)`` fills the store (only what it lacks) and returns
    the stored answers in order, with their store keys."""

    def __init__(self, settings: TeacherSettings, store: ResponseStore, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.client: BlackBoxTeacher | None = None
        self.model: Any = None
        if settings.blackbox is not None:
            self.client = BlackBoxTeacher(settings.blackbox, sampling=settings.sampling, seed=settings.seed, environ=environ)

    def _local(self) -> tuple[Any, Any, str, dict[str, Any]]:
        from lmdistill.data.tokenizer import load_tokenizer
        from lmdistill.generation.sampling import SamplingParams
        from lmdistill.generation.seqkd import local_teacher_id, sampling_params_dict
        from lmdistill.models.loading import load_causal_lm

        assert self.settings.local is not None
        if self.model is None:
            self.model = (load_causal_lm(self.settings.local), load_tokenizer(self.settings.local))
        params = SamplingParams.from_config(self.settings.sampling)
        return (*self.model, local_teacher_id(self.settings.local), sampling_params_dict(params, self.settings.seed))

    def key(self, prompt: str) -> str:
        if self.client is not None:
            return self.client.key(prompt)
        _, _, teacher_id, params = self._local()
        return request_key(prompt, teacher_id, params)

    def answers(self, prompts: Sequence[str]) -> list[tuple[str, str]]:
        """(store key, answer) per prompt."""
        if self.client is not None:
            self.client.fill_store(prompts, self.store)
        else:
            from lmdistill.generation.sampling import SamplingParams
            from lmdistill.generation.seqkd import fill_store_local

            model, tokenizer, teacher_id, _ = self._local()
            fill_store_local(model, tokenizer, prompts, self.store, teacher_id=teacher_id, batch_size=1,
                             params=SamplingParams.from_config(self.settings.sampling), seed=self.settings.seed)
        out = []
        for prompt in prompts:
            key = self.key(prompt)
            record = self.store.get(key)
            assert record is not None, "fill_store raises for prompts it could not answer"
            out.append((key, record["response"]))
        return out


# ------------------------------------------------------------------------------------------- the loop
def _fingerprint(cfg: ActiveConfig) -> dict[str, Any]:
    """The settings a saved state depends on (a resume with other ones is refused)."""
    return {"task": cfg.task.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json"),
            "selection": cfg.active.selection, "queries_per_round": cfg.active.queries_per_round,
            "examples_per_query": cfg.active.examples_per_query, "hard_per_query": cfg.active.hard_per_query,
            "correct_per_query": cfg.active.correct_per_query, "seed": cfg.active.seed,
            **({"teacher_accuracy": cfg.active.teacher_accuracy} if cfg.active.selection == "robust" else {})}


def _load_state(path: Path, cfg: ActiveConfig) -> dict[str, Any]:
    fresh = {"format": STATE_FORMAT, "settings": _fingerprint(cfg), "rounds": [], "added": [], "queries_used": 0,
             "pending": None, "stopped": None}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); remove it to start the loop again") from None
    if state.get("format") != STATE_FORMAT or state.get("settings") != _fingerprint(cfg):
        raise ConfigError(f"{path} belongs to a loop with other settings (task, student, selection or query shape); "
                          "use another output_dir, or remove it to start again")
    return state


def _stop_reason(state: dict[str, Any], active: ActiveSettings) -> str | None:
    accuracy = [r["validation"]["accuracy"] for r in state["rounds"]]
    if len(accuracy) > active.patience and max(accuracy[-active.patience:]) < max(accuracy[:-active.patience]) + active.min_delta:
        return "plateau"
    if state["queries_used"] >= active.budget:
        return "budget"
    if len(state["rounds"]) > active.rounds:
        return "rounds"
    return None


def run_active(cfg: ActiveConfig, *, environ: Mapping[str, str] | None = None, encoder: Any = None,
               task: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or continue) the loop of ``cfg``; returns the summary also written to ``summary.json``. ``encoder``
    and ``task`` override the configured ones (tests and benchmarks reuse a loaded encoder)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = _load_state(state_path, cfg)
    task = task or build_class_task(cfg.task)
    labels: list[str] = task["labels"]
    validation, test = task["validation"], task["test"]
    store = ResponseStore(cfg.teacher.store or out / "teacher_store.jsonl")
    teacher = QueryTeacher(cfg.teacher, store, environ)
    student = StudentClassifier(cfg.student, labels, encoder=encoder)
    active = cfg.active

    def save() -> None:
        write_text_atomic(state_path, json.dumps(state, indent=1))

    while state["stopped"] is None:
        if state["pending"] is None:
            k = len(state["rounds"])
            train = task["seed"] + [Labelled(**e) for e in state["added"]]
            student.fit(train)
            report = student.evaluate(validation)
            test_report = student.evaluate(test)
            state["rounds"].append({"round": k, "train_size": len(train), "train_labels": label_counts(train),
                                    "queries_used": state["queries_used"], "validation": report.summary(),
                                    "test": test_report.summary()})
            log.info("round %d: %d examples, validation accuracy %.3f, test accuracy %.3f", k, len(train),
                     report.accuracy, test_report.accuracy)
            state["stopped"] = _stop_reason(state, active)
            if state["stopped"] is None:
                n = min(active.queries_per_round, active.budget - state["queries_used"])
                probs = student.probabilities([e.text for e in validation]) if active.selection == "robust" else None
                chosen = select_examples(report, validation, labels, mode=active.selection, n_queries=n,
                                         n_shown=active.hard_per_query, n_correct=active.correct_per_query,
                                         seed=derived_seed(active.seed, k), probabilities=probs,
                                         teacher_accuracy=active.teacher_accuracy)
                prompts = [build_prompt(cfg.task.name, labels, report, k, q, validation, active.examples_per_query)
                           for q in chosen]
                state["pending"] = {"round": k, "prompts": prompts, "shown": [[i for i, _, _ in q["shown"]] for q in chosen]}
                state["queries_used"] += len(prompts)  # charged before sending: a crash cannot make them free
            save()
            continue
        pending = state["pending"]
        exclude = {normalize_text(e.text) for part in ("seed", "validation", "test") for e in task[part]}
        exclude |= {normalize_text(e["text"]) for e in state["added"]}
        totals: dict[str, int] = {}
        for key, answer in teacher.answers(pending["prompts"]):
            new, stats = parse_examples(answer, labels, origin=f"teacher:{key}", exclude=exclude)
            state["added"] += [{"text": e.text, "label": e.label, "origin": e.origin} for e in new]
            totals = {s: totals.get(s, 0) + v for s, v in stats.items()}
        state["rounds"][pending["round"]]["teacher"] = {"queries": len(pending["prompts"]), **totals}
        state["pending"] = None
        save()
    summary = {"output_dir": str(out), "stopped": state["stopped"], "queries_used": state["queries_used"],
               "selection": active.selection, "rounds": state["rounds"], "added": len(state["added"])}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


__all__ = [
    "ActiveConfig", "ActiveSettings", "QueryTeacher", "TeacherSettings", "build_prompt", "parse_examples",
    "prompt_examples", "run_active", "select_examples",
]
