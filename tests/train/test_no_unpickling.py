"""No file lmdistill reads is unpickled with arbitrary code: the embedding teacher-signal cache (whose name
is predictable from public settings) is safetensors, a planted pickle at its path is never run, and no
source file calls an unpickling loader."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import torch

from lmdistill.embed.config import parse_config
from lmdistill.embed.mining import build_training_signal
from lmdistill.embed.run import _signal_cache_file, load_signal, save_signal, training_signal
from tests.embed.test_training import char_teacher, toy_task

ROOT = Path(__file__).parents[2]


class _PlantedPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_at_the_signal_cache_path_is_never_run(tmp_path, caplog):
    task = toy_task()
    cfg = parse_config({"method": "m3", "task": {"cache_dir": str(tmp_path)}, "mining": {"top_k": 2}})
    cache_file = _signal_cache_file(cfg, task)
    marker = tmp_path / "pwned"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file, "wb") as f:  # both formats torch.load would have run
        torch.save(_PlantedPayload(marker), f)
    signal = training_signal(cfg, task)
    assert not marker.exists()
    assert "is not a training-signal cache" in caplog.text and "rebuilding it" in caplog.text
    fresh = build_training_signal(task, negatives_from="bm25", top_k=2)
    assert signal.negatives == fresh.negatives and signal.doc_ids == fresh.doc_ids
    again = load_signal(cache_file)  # the rebuilt file replaced the planted one
    assert again.negatives == fresh.negatives
    cache_file.write_bytes(pickle.dumps(_PlantedPayload(marker)))
    training_signal(cfg, task)
    assert not marker.exists()


def test_the_signal_cache_round_trips_exactly(tmp_path):
    task = toy_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3)
    signal.negatives[0] = []  # ragged rows, an empty one included
    save_signal(signal, tmp_path / "s.safetensors")
    back = load_signal(tmp_path / "s.safetensors")
    assert back.doc_ids == signal.doc_ids and back.doc_groups == signal.doc_groups
    assert back.positive_index == signal.positive_index and back.negatives == signal.negatives
    assert torch.equal(back.teacher_query, signal.teacher_query) and torch.equal(back.teacher_docs, signal.teacher_docs)


def _unpickling_calls(path: Path) -> list[str]:
    """Calls that can run code from a file's bytes: torch.load without weights_only=True, pickle/dill/joblib
    loads, numpy loads with allow_pickle=True, pandas read_pickle, yaml.load/unsafe_load."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = f"{owner}.{node.func.attr}"
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(key: str) -> bool:
            value = keywords.get(key)
            return isinstance(value, ast.Constant) and value.value is True

        risky = (
            (name == "torch.load" and not is_true("weights_only"))
            or name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load", "pd.read_pickle",
                        "pandas.read_pickle", "yaml.unsafe_load", "marshal.loads")
            or (name in ("np.load", "numpy.load") and is_true("allow_pickle"))
            or (name == "yaml.load" and "Safe" not in ast.unparse(keywords.get("Loader", ast.Constant(""))))
        )
        if risky:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def test_no_source_file_unpickles():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    assert len(files) > 50
    assert [hit for f in files for hit in _unpickling_calls(f)] == []
