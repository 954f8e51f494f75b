"""The user's own prompts for every regime: prompt/response records (with a template between them) and chat
``messages`` (the documented default template, or the tokenizer's own), through `generate`, `sft` and `distill`."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from typer.testing import CliRunner

from lmdistill.data.userfiles import render_chat
from lmdistill.errors import ConfigError, DataError
from lmdistill.generation.config import TaskConfig
from lmdistill.generation.run import build_task_run
from lmdistill.generation.tasks import apply_chat_template, build_task
from tests.generation.test_run import app_with_commands, task_cfg


@pytest.fixture(scope="module")
def own_examples(tmp_path_factory, kjv_chapters):
    """Prompt/response pairs from real verses (first words -> the rest), in a user's jsonl file."""
    path = tmp_path_factory.mktemp("own") / "pairs.jsonl"
    seen = set()  # distinct prompts: the answer store keys requests by prompt
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        for chapter in kjv_chapters:
            for verse in chapter.text.split("\n"):
                words = verse.split()
                if len(words) < 8 or " ".join(words[:4]) in seen:
                    continue
                seen.add(" ".join(words[:4]))
                f.write(json.dumps({"id": f"v{n}", "prompt": " ".join(words[:4]), "response": " ".join(words[4:10])}) + "\n")
                n += 1
                if n == 300:
                    return path
    return path


@pytest.fixture(scope="module")
def chat_examples(tmp_path_factory, own_examples):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(own_examples, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as f:
        for line in src:
            pair = json.loads(line)
            messages = [{"role": "system", "content": "Continue the verse."}, {"role": "user", "content": pair["prompt"]},
                        {"role": "assistant", "content": pair["response"]}]
            f.write(json.dumps({"id": pair["id"], "messages": messages}) + "\n")
    return path


def test_prompt_response_records_get_the_template_between_prompt_and_response(own_examples):
    first = json.loads(own_examples.read_text().splitlines()[0])
    splits = build_task(TaskConfig(path=str(own_examples), prompt_template="Verse: {prompt} =>"))
    docs = [d for split in splits.values() for d in split]
    assert len(docs) == 300 and all(splits[s] for s in ("train", "validation", "test"))
    doc = next(d for d in docs if d.doc_id.endswith(":v0"))
    assert doc.prompt == f"Verse: {first['prompt']} =>" and doc.response == first["response"]
    assert doc.text == doc.prompt + doc.response
    # the same file and fractions give the same split every time (split by the record id's hash)
    assert build_task(TaskConfig(path=str(own_examples))).keys() == splits.keys()
    assert [d.doc_id for d in build_task(TaskConfig(path=str(own_examples)))["test"]] == [d.doc_id for d in splits["test"]]


def test_chat_messages_use_the_default_template_or_the_tokenizers(chat_examples, verse_tokenizer):
    splits = build_task(TaskConfig(path=str(chat_examples)))
    doc = splits["train"][0]
    messages = doc.meta["messages"]
    assert doc.prompt == f"<|system|>\nContinue the verse.\n<|user|>\n{messages[1]['content']}\n<|assistant|>\n"
    assert doc.prompt == render_chat(messages[:-1]) and doc.response == messages[-1]["content"]
    with pytest.raises(DataError, match="has no chat template"):
        apply_chat_template(splits, verse_tokenizer)
    tokenizer = copy.deepcopy(verse_tokenizer)  # the session fixture stays without a template
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    rendered = apply_chat_template(splits, tokenizer)["train"][0]
    assert rendered.prompt == f"[system] Continue the verse. [user] {messages[1]['content']} [assistant]"
    assert rendered.response == doc.response and rendered.doc_id == doc.doc_id


def test_mistakes_in_own_task_files_are_named(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(DataError, match="plain.jsonl:1: a task example needs a prompt and a response"):
        build_task(TaskConfig(path=str(plain)))
    bad_chat = tmp_path / "chat.jsonl"
    bad_chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1.*last message must be the assistant's"):
        build_task(TaskConfig(path=str(bad_chat)))
    with pytest.raises(ValueError, match="either 'name'"):
        TaskConfig(name="kjv_verse", path=str(plain))
    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        TaskConfig(path=str(plain), prompt_template="no placeholder")


@pytest.mark.parametrize("regime", [
    {"kind": "on_policy", "lmbda": 1.0, "sampling": {"max_new_tokens": 6}},
    {"kind": "scrg", "sampling": {"max_new_tokens": 6}},
    {"kind": "kid", "kid_mask_ratio": 0.2},
])
def test_every_regime_trains_on_own_prompts(tmp_path, student_dir, saved_teacher, chat_examples, regime):
    task = {"path": str(chat_examples), "max_examples": {"train": 40, "validation": 8, "test": 8}}
    cfg = task_cfg(tmp_path, student_dir, saved_teacher, objective="forward_kl",
                   regime={**regime, "max_length": 48, "task": task}, train={"steps": 2})
    run = build_task_run(cfg, show_progress=False)
    assert all(d.meta.get("messages") for d in run.splits["train"])
    result = run.trainer.train()
    assert run.trainer.step == 2 and all(r["loss"] == r["loss"] for r in result.history if "loss" in r)


def test_generate_sft_and_sequence_kd_on_own_prompts_through_the_cli(tmp_path, student_dir, saved_teacher, own_examples):
    runner = CliRunner()
    app = app_with_commands()
    task = {"path": str(own_examples), "max_examples": {"train": 16, "validation": 8, "test": 8}}
    store = tmp_path / "answers.jsonl"
    gen = tmp_path / "gen.yaml"
    gen.write_text(yaml.safe_dump({"task": task, "store": str(store), "teacher": {"path": str(saved_teacher)},
                                   "sampling": {"greedy": True, "max_new_tokens": 6}}))
    result = runner.invoke(app, ["generate", str(gen)])
    assert result.exit_code == 0, result.output
    assert len(store.read_text().splitlines()) == 16
    sft = task_cfg(tmp_path / "sft", student_dir).model_dump(mode="json")
    sft["regime"]["task"] = task
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    result = runner.invoke(app, ["sft", str(tmp_path / "sft.yaml"), "--set", "train.steps=2"])
    assert result.exit_code == 0, result.output
    kd = task_cfg(tmp_path / "kd", student_dir).model_dump(mode="json")
    kd["regime"] = {"kind": "sequence_kd", "store": str(store), "max_length": 48, "task": task}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(kd))
    result = runner.invoke(app, ["distill", str(tmp_path / "kd.yaml"), "--set", "train.steps=2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "kd" / "run" / "generation_metrics.json").read_text())
    assert metrics["generation"]["n"] == 8


def test_tokenizer_chat_template_for_a_blackbox_teacher_is_refused(tmp_path, chat_examples):
    from lmdistill.config import validate_config
    from lmdistill.generation.run import run_generate
    from lmdistill.generation.run_config import GenerateConfig

    cfg = validate_config({"task": {"path": str(chat_examples), "chat_template": "tokenizer"}, "store": str(tmp_path / "s.jsonl"),
                           "blackbox": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}, "test", GenerateConfig)
    with pytest.raises(ConfigError, match="needs a local teacher"):
        run_generate(cfg)
