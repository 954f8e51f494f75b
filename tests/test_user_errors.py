"""A new user's mistakes: each is one line naming the key or file and the fix, found before any data is
tokenized or model loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmdistill.config import check_model_paths, load_config
from lmdistill.data.prepare import prepare_data
from lmdistill.errors import ConfigError, DataError
from tests.conftest import save_tiny_model


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdistill.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}, timeout=600)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_unknown_key_without_a_close_match_lists_the_allowed_keys_after_a_separator(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, "train: {zzz: 3}\n"))
    message = str(info.value)
    assert "train.zzz: unknown key; allowed keys here: " in message and "batch_size" in message
    assert "\n" not in message  # one mistake, one line


def test_a_yaml_error_names_the_file_line_and_column_not_a_unicode_string(tmp_path):
    path = _config(tmp_path, "train:\n  steps: 3\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and "<unicode string>" not in message and "not valid YAML" in message
    line = int(message[len(str(path)) + 1:].split(":")[0])
    assert line in (3, 4)  # the unclosed list starts on line 3; the parser notices at the end


def test_a_bad_override_value_is_named():
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1,': the value is not valid YAML") as info:
        load_config(None, ["train.lr=[1,"])
    assert "<unicode string>" not in str(info.value)


def test_a_misspelt_corpus_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="data.corpus 'kjvv' is neither a built-in corpus .* did you mean 'kjv'"):
        load_config(None, ["data.corpus=kjvv"])


def test_micro_batch_larger_than_the_global_batch_is_refused():
    with pytest.raises(ConfigError, match="micro_batch_size 32 is larger than batch_size 16"):
        load_config(None, ["train.micro_batch_size=32", "train.batch_size=16"])
    load_config(None, ["train.micro_batch_size=16", "train.batch_size=16"])


def test_a_corpus_too_small_for_a_validation_block_says_why_and_how_to_fix_it(tmp_path, cache_dir, small_tokenizer):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.\nAnd the earth was without form.\n")
    with pytest.raises(DataError) as info:
        prepare_data(str(corpus), block_size=64, tokenizer=small_tokenizer, cache_dir=cache_dir)
    message = str(info.value)
    assert "split of" in message and "too small" in message and "data.split_fractions" in message
    assert "data.block_size" in message


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, small_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("paths")
    save_tiny_model(root / "teacher-run" / "final", small_tokenizer, layers=1, hidden=16)
    save_tiny_model(root / "student", small_tokenizer, layers=1, hidden=16)
    small_tokenizer.save_pretrained(root / "only-tokenizer")
    (root / "a-file.bin").write_bytes(b"not a model")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    return root


@pytest.mark.parametrize("name, key, expected", [
    ("teacher-run", "teacher", "is a run directory; did you mean '{root}/teacher-run/final'"),
    ("studnet", "student", "does not exist; did you mean '{root}/student'"),
    ("only-tokenizer", "teacher", "holds a tokenizer but no model: no config.json"),
    ("a-file.bin", "student", "is a file; give the directory"),
    ("broken", "teacher", "config.json is not valid JSON"),
    ("no-weights", "student", "has a config.json but no safetensors weights"),
])
def test_model_path_mistakes_name_the_key_and_what_the_directory_lacks(model_dirs, name, key, expected):
    path = model_dirs / name
    raw = [f"{key}.path={path}"] + (["student.preset=null"] if key == "student" else [])
    try:
        config = load_config(None, raw)
    except ConfigError as exc:  # a missing path is refused by the config itself
        message = str(exc)
    else:
        with pytest.raises(ConfigError) as info:
            check_model_paths(config)
        message = str(info.value)
    assert f"{key}.path" in message
    assert expected.format(root=model_dirs) in message
    assert "\n" not in message


def test_a_good_model_path_passes(model_dirs):
    config = load_config(None, [f"teacher.path={model_dirs / 'teacher-run' / 'final'}", "student.preset=null",
                                f"student.path={model_dirs / 'student'}"])
    check_model_paths(config)


def test_the_cli_refuses_a_run_directory_as_teacher_in_one_line_before_tokenizing(tmp_path, model_dirs, cache_dir):
    config = _config(tmp_path, f"teacher: {{path: {model_dirs / 'teacher-run'}}}\noutput_dir: {tmp_path / 'run'}\n"
                               f"data: {{cache_dir: {tmp_path / 'empty-cache'}}}\n")
    out = _cli("distill", str(config))
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "teacher.path" in lines[0] and "did you mean" in lines[0] and "final" in lines[0]
    assert not (tmp_path / "empty-cache").exists()  # nothing was tokenized


def test_a_block_size_beyond_a_learned_position_table_names_the_model_and_the_key(tmp_path, small_tokenizer, cache_dir):
    from lmdistill.config import check_block_size

    teacher = save_tiny_model(tmp_path / "teacher", small_tokenizer, layers=1, hidden=16)  # GPT-2: learned positions
    positions = json.loads((teacher / "config.json").read_text())["n_positions"]
    config = load_config(None, [f"teacher.path={teacher}", f"data.block_size={positions * 2}"])
    with pytest.raises(ConfigError) as info:
        check_block_size(config, config.block_size)
    message = str(info.value)
    assert f"block size {positions * 2} exceeds the teacher's {positions} positions" in message
    assert "config.json n_positions" in message and f"at most {positions}" in message
    assert check_block_size(config, positions) == []
    run_config = _config(tmp_path, f"teacher: {{path: {teacher}}}\noutput_dir: {tmp_path / 'run'}\n"
                                   f"data: {{block_size: {positions * 2}, cache_dir: {tmp_path / 'empty-cache'}}}\n")
    out = _cli("distill", str(run_config))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "empty-cache").exists()


def test_report_command_and_quiet_then_verbose_logging(tmp_path, model_dirs, kjv_small_txt, cache_dir):
    """A tiny pretraining through the CLI: no weight-loading bars without -v, debug lines with -v, evaluation
    results printed, and `lmdistill report` on the run directory."""
    run = tmp_path / "run"
    common = ["--set", f"data.corpus={kjv_small_txt}", "--set", f"data.cache_dir={cache_dir}", "--set", "data.block_size=32",
              "--set", f"student.path={model_dirs / 'student'}", "--set", "student.preset=null",
              "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "eval.every=2", "--set", "eval.max_batches=1",
              "--set", "checkpoint.every=100", "--set", f"tokenizer.path={model_dirs / 'student'}"]
    out = _cli("pretrain", "--set", f"output_dir={run}", *common)
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "eval at step 2:" in out.stdout
    verbose = _cli("-v", "pretrain", "--set", f"output_dir={tmp_path / 'verbose'}", *common)
    assert verbose.returncode == 0 and "DEBUG" in verbose.stderr
    rep = _cli("report", str(run), "--output", str(tmp_path / "report"))
    assert rep.returncode == 0, rep.stderr
    assert "| run |" in rep.stdout and (tmp_path / "report" / "curves.png").exists()


def test_the_vocabulary_rung_is_logged_and_a_different_tokenizer_refused_with_what_works(tmp_path, small_tokenizer,
                                                                                         kjv_small_txt, cache_dir, caplog):
    import logging

    from lmdistill.data.tokenizer import train_bpe_tokenizer
    from lmdistill.teachers.live import load_live_teacher

    teacher = save_tiny_model(tmp_path / "teacher", small_tokenizer, layers=1, hidden=16, extra_rows=8)
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        live = load_live_teacher(teacher, tokenizer=small_tokenizer, student_tokenizer=small_tokenizer,
                                 student_rows=len(small_tokenizer))
    assert live.alignment.rung == "padded"
    assert any("vocabulary rung 2 (padded)" in r.getMessage() for r in caplog.records)
    other = train_bpe_tokenizer([kjv_small_txt.read_text()[:20000]], vocab_size=300)
    with pytest.raises(ConfigError) as info:
        load_live_teacher(teacher, tokenizer=small_tokenizer, student_tokenizer=other, student_rows=len(other))
    message = str(info.value)
    assert "only in teacher" in message or "only in" in message or "rung" in message
    assert "sequence_kd" in message and "span_kd" in message  # what works across tokenizers is offered


@pytest.mark.parametrize("text, overrides, expected", [
    ("train: {zzz: 3}\n", [], "train.zzz: unknown key; allowed keys here:"),
    ("train:\n  lr: [1, 2\n", [], "not valid YAML"),
    ("", ["data.corpus=kjvv"], "did you mean 'kjv'"),
    ("", ["train.micro_batch_size=32", "train.batch_size=16"], "micro_batch_size 32 is larger than batch_size 16"),
])
def test_config_mistakes_through_the_cli_are_one_line_with_exit_code_2(tmp_path, text, overrides, expected):
    config = _config(tmp_path, text or "output_dir: runs/x\n")
    out = _cli("pretrain", str(config), *[a for o in overrides for a in ("--set", o)])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert "<unicode string>" not in out.stderr


def test_a_too_small_corpus_through_the_cli_says_why(tmp_path, small_tokenizer):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.\n")
    tok = tmp_path / "tok"
    small_tokenizer.save_pretrained(tok)
    out = _cli("pretrain", "--set", f"data.corpus={corpus}", "--set", f"tokenizer.path={tok}", "--set", "data.block_size=64",
               "--set", f"output_dir={tmp_path / 'run'}", "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and "too small" in lines[0] and "data.split_fractions" in lines[0], out.stderr
