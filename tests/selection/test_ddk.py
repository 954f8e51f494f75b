"""DDK (arXiv 2407.16154): the weight formulas against a float64 hand computation, their invariants, the mixture
sampler, and a real mixture run that resumes exactly with its mixture state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.config import validate_config
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.selection.ddk import MixtureWeights, discrepancy_factor, smooth_update, static_weights
from lmdistill.selection.ddk_run import MixtureRunConfig, build_mixture_trainer, run_mixture
from lmdistill.train.mixture_source import MixtureSource
from tests.conftest import save_tiny_model


# ------------------------------------------------------------------------------------------ the formulas
def hand_eq1(ell_s: list[float], ell_t: list[float]) -> list[float]:
    """Eq. 1 written out: r[i] = exp(ell_S[i]/ell_T[i]) / sum_i' exp(ell_S[i']/ell_T[i'])."""
    e = [math.exp(s / t) for s, t in zip(ell_s, ell_t)]
    return [x / sum(e) for x in e]


def hand_eq2(r: list[float], ell_s: list[float], ell_t: list[float], alpha: float) -> list[float]:
    """Eq. 2 written out: psi[i] = r[i] exp(ell_S[i]/ell_T[i]); r'[i] = alpha psi[i]/sum psi + (1-alpha)/N."""
    psi = [ri * math.exp(s / t) for ri, s, t in zip(r, ell_s, ell_t)]
    return [alpha * p / sum(psi) + (1 - alpha) / len(r) for p in psi]


def test_weights_match_a_float64_hand_computation_on_known_perplexities():
    teacher = [12.0, 30.0, 55.0, 20.0]                    # ell_T per domain (fixed)
    students = [[40.0, 60.0, 90.0, 50.0],                 # ell_S at step 0 ...
                [30.0, 48.0, 80.0, 34.0],                 # ... after K steps
                [22.0, 41.0, 72.0, 27.0]]                 # ... after 2K steps
    weights = MixtureWeights(["kjv", "gcide", "jargon", "fortunes"], "ddk", interval=5, alpha=0.5)
    expected = hand_eq1(students[0], teacher)
    got = weights.update(0, students[0], teacher)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)
    # kjv's ratio 40/12 = 3.33 is the largest, so it gets the largest share
    assert int(np.argmax(got)) == 0
    for step, student in zip((5, 10), students[1:]):
        expected = hand_eq2(expected, student, teacher, 0.5)
        got = weights.update(step, student, None)
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)
    assert [h["step"] for h in weights.history] == [0, 5, 10]
    np.testing.assert_allclose(weights.history[-1]["ratio"], np.array(students[2]) / np.array(teacher), rtol=1e-15)
    # the literal numbers for the first update (by hand: e^{10/3}, e^2, e^{18/11}, e^{5/2})
    e = [math.exp(10 / 3), math.exp(2), math.exp(18 / 11), math.exp(2.5)]
    assert discrepancy_factor(students[0], teacher)[0] == pytest.approx(e[0] / sum(e), rel=1e-14)


def test_without_smoothing_every_update_is_eq1():
    weights = MixtureWeights(["a", "b"], "ddk", interval=3, smooth=False)
    weights.update(0, [10.0, 20.0], [5.0, 5.0])
    got = weights.update(3, [6.0, 9.0], None)
    np.testing.assert_allclose(got, hand_eq1([6.0, 9.0], [5.0, 5.0]), rtol=1e-14)


ppl = st.floats(min_value=1.0, max_value=5e3, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 8), data=st.data(), alpha=st.floats(0.0, 1.0))
def test_weight_invariants(n, data, alpha):
    ell_t = data.draw(st.lists(ppl, min_size=n, max_size=n))
    ell_s0 = data.draw(st.lists(ppl, min_size=n, max_size=n))
    ell_s1 = data.draw(st.lists(ppl, min_size=n, max_size=n))
    r0 = discrepancy_factor(ell_s0, ell_t)
    assert r0.sum() == pytest.approx(1.0, abs=1e-12) and np.all(r0 >= 0)
    ratio = np.array(ell_s0) / np.array(ell_t)
    # a larger student/teacher perplexity ratio never gets a smaller weight
    order = np.argsort(ratio, kind="stable")
    assert np.all(np.diff(r0[order]) >= -1e-15)
    r1 = smooth_update(r0, ell_s1, ell_t, alpha)
    assert r1.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(r1 >= (1 - alpha) / n - 1e-15)           # the constant term's floor
    assert np.all(r1 <= alpha + (1 - alpha) / n + 1e-12)
    # equal ratios leave the history term as it was: r' = alpha r + (1 - alpha)/N
    same = smooth_update(r0, ell_t, ell_t, alpha)
    np.testing.assert_allclose(same, alpha * r0 + (1 - alpha) / n, rtol=1e-12, atol=1e-15)


def test_extreme_ratios_stay_finite_and_bad_input_is_refused():
    r = discrepancy_factor([5e4, 1.0], [1.0, 1.0])          # exp(5e4) overflows; the softmax does not
    assert np.all(np.isfinite(r)) and r[0] == pytest.approx(1.0)
    assert np.all(np.isfinite(smooth_update([0.5, 0.5], [9e4, 2.0], [1.0, 1.0])))
    with pytest.raises(ConfigError, match="perplexities"):
        discrepancy_factor([1.0, float("nan")], [1.0, 1.0])
    with pytest.raises(ConfigError, match="alpha"):
        smooth_update([0.5, 0.5], [1.0, 2.0], [1.0, 1.0], alpha=1.5)
    np.testing.assert_allclose(static_weights("proportional", [1, 3]), [0.25, 0.75])


def test_update_schedule_and_state_round_trip_through_json():
    w = MixtureWeights(["a", "b", "c"], "ddk", interval=4)
    assert w.due(0)
    w.update(0, [3.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    assert [s for s in range(13) if w.due(s)] == [4, 8, 12]
    w.update(4, [2.0, 2.0, 1.0])
    assert not w.due(4) and w.due(8)
    copy = MixtureWeights(["a", "b", "c"], "ddk", interval=4)
    copy.load_state_dict(json.loads(json.dumps(w.state_dict())))
    assert copy.weights == w.weights and copy.history == w.history and copy.teacher_ppl == w.teacher_ppl
    with pytest.raises(ConfigError, match="same domains"):
        MixtureWeights(["a", "b"], "ddk").load_state_dict(w.state_dict())
    fixed = MixtureWeights(["a", "b"], "uniform")
    assert fixed.weights == [0.5, 0.5] and not fixed.due(0)


# ------------------------------------------------------------------------------------------ the sampler
class _Blocks:
    """Stand-in blocks: item i of domain d is a row of the value 100 * d + i (so a row names its block)."""

    def __init__(self, domain: int, n: int) -> None:
        self.domain, self.n = domain, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.full((4,), 100 * self.domain + i, dtype=torch.long)
        return {"input_ids": row, "labels": row}


def _source(weights=(0.6, 0.3, 0.1), batch=8, seed=0) -> MixtureSource:
    names = ["a", "b", "c"]
    w = MixtureWeights(names, "uniform")
    w.weights = list(weights)
    return MixtureSource({n: _Blocks(d, 7 + 3 * d) for d, n in enumerate(names)}, w, global_batch=batch, seed=seed)


def _rows(batches) -> list[int]:
    return [int(b["input_ids"][i, 0]) for b in batches for i in range(b["input_ids"].shape[0])]


def test_sampler_follows_the_weights_reads_each_domain_cyclically_and_splits_ranks():
    src = _source(batch=16)
    rows = [r for s in range(250) for r in _rows(src.micro_batches(s, 0, 1, 16))]
    share = np.bincount([r // 100 for r in rows], minlength=3) / len(rows)
    np.testing.assert_allclose(share, [0.6, 0.3, 0.1], atol=0.02)
    for d, n in enumerate((7, 10, 13)):
        seen = [r % 100 for r in rows if r // 100 == d]
        assert sorted(seen[:n]) == list(range(n))             # one full pass before any block repeats
        assert sorted(seen[n:2 * n]) == list(range(n))
    # two ranks together read what one process reads, each its contiguous share
    one, two = _source(), _source()
    for step in range(6):
        whole = _rows(one.micro_batches(step, 0, 1, 4))
        parts = []
        for rank in (0, 1):
            clone = _source()
            clone.load_state_dict(two.state_dict())
            parts += _rows(clone.micro_batches(step, rank, 2, 2))
        two.load_state_dict(clone.state_dict())
        assert parts == whole
    with pytest.raises(LmdistillError, match="step 9"):
        one.micro_batches(9, 0, 1, 4)


def test_sampler_state_resumes_the_same_draws():
    src = _source()
    for s in range(5):
        src.micro_batches(s, 0, 1, 8)
    saved = json.loads(json.dumps(src.state_dict()))
    expected = [_rows(src.micro_batches(s, 0, 1, 8)) for s in range(5, 12)]
    again = _source()
    again.load_state_dict(saved)
    assert [_rows(again.micro_batches(s, 0, 1, 8)) for s in range(5, 12)] == expected


# ------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two real domains as user files: 24 KJV chapters and 300 computer fortunes (one record a paragraph)."""
    from lmdistill.data.corpora import read_fortunes, read_kjv

    root = tmp_path_factory.mktemp("domains")
    bible = root / "bible.txt"
    bible.write_text("\n\n".join(d.text for d in list(read_kjv())[:24]) + "\n", encoding="utf-8")
    fortunes = root / "fortunes.txt"
    texts = [" ".join(d.text.split()) for d in read_fortunes() if d.meta["category"] == "computers"][:300]
    fortunes.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return bible, fortunes


def _config(tmp, domains, cache_dir, student, teacher, **mixture) -> MixtureRunConfig:
    bible, fortunes = domains
    raw = {
        "output_dir": str(tmp),
        "domains": [{"name": "bible", "source": str(bible)}, {"name": "fortunes", "source": str(fortunes)}],
        "data": {"block_size": 32, "cache_dir": str(cache_dir), "split_fractions": [0.6, 0.2, 0.2]},
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "objective": {"mix": [{"name": "cross_entropy", "weight": 1.0}, {"name": "forward_kl", "weight": 0.2}]},
        "mixture": {"policy": "ddk", "interval": 2, "validation_blocks": 4, **mixture},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1},
        "eval": {"every": 1000, "max_batches": 1, "batch_size": 4},
        "checkpoint": {"every": 2, "keep": 3},
    }
    return validate_config(raw, "test", model=MixtureRunConfig)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_ddk_run_measures_perplexities_and_resumes_exactly(tmp_path, two_domains, cache_dir, small_tokenizer, tiny_teacher,
                                                           monkeypatch):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)
    full, data = build_mixture_trainer(_config(tmp_path / "full", two_domains, cache_dir, student, tiny_teacher),
                                       show_progress=False)
    # the first weights come from the initial student: check its perplexities independently (float64)
    model = full.accelerator.unwrap_model(full.model)
    sample = [data.blocks(n, "validation")[i] for n in data.names for i in range(4)]
    with torch.no_grad():
        expected_ppl = []
        for d in range(2):
            items = sample[4 * d: 4 * d + 4]
            ids = torch.stack([x["input_ids"] for x in items])
            labels = torch.stack([x["labels"] for x in items])
            logits = model(input_ids=ids).logits.double()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            expected_ppl.append(math.exp(nll.item()))
    full.train()
    history = full.source.weights.history
    assert [h["step"] for h in history] == [0, 2, 4]
    np.testing.assert_allclose(history[0]["student_ppl"], expected_ppl, rtol=1e-5)
    np.testing.assert_allclose(history[0]["weights"], hand_eq1(history[0]["student_ppl"], full.source.weights.teacher_ppl),
                               rtol=1e-12)
    np.testing.assert_allclose(history[1]["weights"], hand_eq2(history[0]["weights"], history[1]["student_ppl"],
                                                               full.source.weights.teacher_ppl, 0.5), rtol=1e-12)
    expected = _weights(full)
    expected_state = full.source.state_dict()
    full.close()

    cfg = _config(tmp_path / "killed", two_domains, cache_dir, student, tiny_teacher)
    killed, _ = build_mixture_trainer(cfg, show_progress=False)
    original = killed.train_step

    def dies_in_step_5(step):
        if step == 4:  # checkpoint 4 written; step 5 has drawn its batch (and updated the weights), then dies
            killed.source.micro_batches(step, 0, 1, 4)
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(killed, "train_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed, _ = build_mixture_trainer(cfg, show_progress=False)
    resumed.train(resume=True)
    got = _weights(resumed)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert resumed.source.state_dict() == expected_state
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    mixture_steps = [r["step"] for r in records if r["kind"] == "mixture"]
    assert mixture_steps == [1, 3, 5]                   # the redone update is logged once


def test_fixed_mixture_run_end_to_end(tmp_path, two_domains, cache_dir, small_tokenizer, tiny_teacher):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=3)
    cfg = _config(tmp_path / "run", two_domains, cache_dir, student, tiny_teacher, policy="proportional")
    summary = run_mixture(cfg, show_progress=False)
    sizes = summary["weights_history"][0]["weights"]
    assert len(summary["weights_history"]) == 1 and sizes[0] != pytest.approx(0.5)
    metrics = summary["validation"]
    assert set(metrics) >= {"bpb/bible", "bpb/fortunes", "bits_per_byte", "worst_bits_per_byte"}
    assert metrics["bits_per_byte"] == pytest.approx((metrics["bpb/bible"] + metrics["bpb/fortunes"]) / 2)
    assert (tmp_path / "run" / "mixture.png").exists() and (tmp_path / "run" / "final").is_dir()


def test_config_errors_name_the_key(tmp_path, two_domains, cache_dir, small_tokenizer, tiny_teacher):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32)
    good = _config(tmp_path, two_domains, cache_dir, student, tiny_teacher).model_dump(mode="json")
    bad = {**good, "data": {**good["data"], "corpus": "gcide"}}
    with pytest.raises(ConfigError, match="data.corpus"):
        validate_config(bad, "test", model=MixtureRunConfig)
    bad = {**good, "teacher": None}
    with pytest.raises(ConfigError, match="needs a\\s+teacher"):
        validate_config(bad, "test", model=MixtureRunConfig)
    bad = {**good, "domains": [good["domains"][0], {**good["domains"][1], "name": "bible"}]}
    with pytest.raises(ConfigError, match="used twice"):
        validate_config(bad, "test", model=MixtureRunConfig)
    bad = {**good, "domains": [good["domains"][0], {"name": "x", "source": "nowhere.txt"}]}
    with pytest.raises(ConfigError, match="nowhere.txt"):
        validate_config(bad, "test", model=MixtureRunConfig)
