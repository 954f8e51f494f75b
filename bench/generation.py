"""Generation-based distillation regimes on one real task, same student, same steps and batch.

Task: kjv_continue (prompt "BOOK C:V" + a verse's first 5 words, reference: its next 3 words), split by
chapter. The teacher is trained on the task's whole training split, well beyond the students' budget
(train once, reused from the output directory on later runs); the students all see the same seeded
subset of it. Every row trains the same student initialisation for the same number of steps with the
same batch size through the one Trainer, changing only the data regime (and the objective:
cross-entropy for label-only SFT and sequence-level KD, forward KL otherwise):

    label-only SFT      fixed gold responses, cross_entropy
    token-level KD      fixed gold responses, forward_kl to the teacher
    sequence-level KD   the teacher's greedy answers (generated once, stored), cross_entropy
    on-policy GKD       lambda = 0.5 student samples, forward_kl
    SCRG                as GKD, each sample's most divergent disagreeing token (KL) replaced by the
                        teacher's, the rest re-generated (the paper's rule), forward_kl
    KID                 alpha = 0.2 of response tokens masked, predicted by the student, rewritten
                        (the paper's default), forward_kl
    extra rows          SCRG with the first-above-threshold rule (KL > 1.0, the previous default), and
                        KID with the paper's loss (reverse KL + cross-entropy)

Scores on held-out test prompts (greedy): ROUGE-L, exact match, the teacher's log-likelihood of the
student's answers (nats/token), and the reference responses' NLL under the model (padded batches); the
trainer's final validation loss (response-only NLL of 128 validation examples, task_evaluator). Wall
time: the training loop (includes on-policy generation, SCRG revision, KID prediction); sequence-level
KD's one-off teacher generation is listed separately. The 1-minute load average before and after is
printed (other jobs share the cores, so wall times are indicative only).

    .venv/bin/python bench/generation.py                 # full run (~10-15 min on 2 shared cores)
    .venv/bin/python bench/generation.py --quick         # pipeline smoke test (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lmdistill.config import validate_config  # noqa: E402
from lmdistill.data.corpora import read_kjv  # noqa: E402
from lmdistill.data.documents import split_of  # noqa: E402
from lmdistill.data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from lmdistill.generation.config import TaskConfig  # noqa: E402
from lmdistill.generation.run_config import TaskRunConfig  # noqa: E402
from lmdistill.generation.run import run_task  # noqa: E402
from lmdistill.generation.sampling import SamplingParams  # noqa: E402
from lmdistill.generation.seqkd import fill_store_local  # noqa: E402
from lmdistill.generation.store import ResponseStore  # noqa: E402
from lmdistill.generation.tasks import build_task  # noqa: E402
from lmdistill.models.loading import build_from_preset, count_parameters, load_causal_lm  # noqa: E402

TEACHER_SHAPE = {"n_layer": 4, "n_embd": 160, "n_head": 4}
STUDENT_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-generation")
    p.add_argument("--steps", type=int, default=200, help="student steps (every regime)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--train-examples", type=int, default=6400, help="the students' training subset")
    p.add_argument("--test-examples", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes on shared cores)")
    p.add_argument("--fresh-teacher", action="store_true", help="retrain the teacher even if one is saved")
    p.add_argument("--quick", action="store_true", help="tiny run to check the pipeline")
    return p.parse_args()


def task_run_config(out: Path, name: str, *, student: Path, teacher: Path | None, objective, regime: dict,
                    steps: int, batch: int, lr: float, warmup: int, task: TaskConfig, test_examples: int,
                    max_new_tokens: int, cache: Path) -> TaskRunConfig:
    raw = {
        "output_dir": str(out / name),
        "cache_dir": str(cache),
        "student": {"path": str(student)},
        "objective": objective,
        "regime": {"task": task.model_dump(mode="json"), "max_length": 64, **regime},
        "train": {"steps": steps, "batch_size": batch, "lr": lr, "warmup_steps": warmup, "log_every": max(1, steps // 10),
                  "seed": 0},
        "eval": {"every": 10**6, "max_batches": 4, "batch_size": 32},
        "checkpoint": {"every": 10**6, "keep": 1},
        "generation": {"split": "test", "max_examples": test_examples, "batch_size": 64,
                       "sampling": {"greedy": True, "max_new_tokens": max_new_tokens}},
    }
    if teacher is not None:
        raw["teacher"] = {"path": str(teacher)}
    return validate_config(raw, f"bench:{name}", TaskRunConfig)


def main() -> int:
    args = parse_args()
    if args.quick:
        args.steps, args.teacher_steps, args.train_examples, args.test_examples = 20, 60, 640, 40
        args.out = args.out + "-quick"
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    # ---- task and tokenizer ------------------------------------------------------------------
    chapters = list(read_kjv())
    task = TaskConfig(name="kjv_continue", prompt_words=5, response_words=3,
                      max_examples={"validation": 200, "test": args.test_examples})
    splits = build_task(task, chapters)  # the teacher's: the whole training split
    keep = sorted(random.Random(0).sample(range(len(splits["train"])), min(args.train_examples, len(splits["train"]))))
    student_splits = {**splits, "train": [splits["train"][i] for i in keep]}
    if args.quick:
        splits = student_splits
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_text = [c.text for c in chapters if split_of(c.doc_id) == "train"]
        train_bpe_tokenizer(train_text, vocab_size=2048).save_pretrained(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    print(f"task kjv_continue: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} (students: train "
          f"{len(student_splits['train'])}); vocab {len(tokenizer)}", flush=True)

    # ---- initial weights: one teacher shape, one student shape (every regime starts from the same student)
    inits = {}
    for name, shape, seed in (("teacher-init", TEACHER_SHAPE, 1), ("student-init", STUDENT_SHAPE, 2)):
        path = out / name
        if not (path / "model.safetensors").exists():
            preset = "gpt2-teacher-7m" if name.startswith("teacher") else "gpt2-student-1.5m"
            model = build_from_preset(preset, tokenizer, max_positions=128, seed=seed, overrides=shape)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        inits[name] = path

    # ---- teacher: fine-tuned on the task (label-only), well beyond the students' budget ---------
    teacher_dir = out / "teacher" / "final"
    spec = {"shape": TEACHER_SHAPE, "steps": args.teacher_steps, "batch": args.batch, "train": len(splits["train"]),
            "task": task.model_dump(mode="json"), "layout": "bos-prompt-response-eos"}
    spec_file = out / "teacher" / "spec.json"
    teacher_seconds = None
    reuse = teacher_dir.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec and not args.fresh_teacher
    if not reuse:
        cfg = task_run_config(out, "teacher", student=inits["teacher-init"], teacher=None, objective="cross_entropy",
                              regime={"kind": "fixed"}, steps=args.teacher_steps, batch=args.batch, lr=3e-3,
                              warmup=50, task=task, test_examples=args.test_examples,
                              max_new_tokens=args.max_new_tokens, cache=cache)
        metrics = run_task(cfg, splits=splits, show_progress=False)
        spec_file.write_text(json.dumps(spec))
        teacher_seconds = metrics["train_seconds"]
        print(f"teacher trained: {args.teacher_steps} steps in {teacher_seconds:.0f}s", flush=True)
    else:
        print(f"teacher reused from {teacher_dir}", flush=True)
    teacher_metrics = json.loads((out / "teacher" / "generation_metrics.json").read_text())

    # ---- sequence-level KD data: the teacher's greedy answers to the training prompts -----------
    store_path = out / "teacher_answers.jsonl"
    if not reuse and store_path.exists():
        store_path.unlink()  # answers of an older teacher
    teacher_model = load_causal_lm(teacher_dir)
    start = time.perf_counter()
    report = fill_store_local(teacher_model, tokenizer, [d.prompt for d in student_splits["train"]], ResponseStore(store_path),
                              teacher_id=f"bench-teacher-{args.teacher_steps}",
                              params=SamplingParams(greedy=True, max_new_tokens=args.max_new_tokens), batch_size=256)
    seqkd_generation_seconds = time.perf_counter() - start
    print(f"teacher answers: {report.requested} generated, {report.already_stored} reused, "
          f"{seqkd_generation_seconds:.0f}s", flush=True)
    del teacher_model

    # ---- the regimes -------------------------------------------------------------------------
    rows = [
        ("label-only SFT", "cross_entropy", {"kind": "fixed"}),
        ("token-level KD", "forward_kl", {"kind": "fixed"}),
        ("sequence-level KD", "cross_entropy", {"kind": "sequence_kd", "store": str(store_path)}),
        ("on-policy GKD (lambda 0.5)", "forward_kl",
         {"kind": "on_policy", "lmbda": 0.5, "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens}}),
        ("SCRG (lambda 0.5, max-KL token)", "forward_kl",
         {"kind": "scrg", "lmbda": 0.5, "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens}}),
        ("KID (alpha 0.2)", "forward_kl", {"kind": "kid", "kid_mask_ratio": 0.2}),
        ("extra: SCRG (first token with KL > 1.0)", "forward_kl",
         {"kind": "scrg", "lmbda": 0.5, "scrg_selection": "first", "scrg_threshold": 1.0,
          "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens}}),
        ("extra: KID (alpha 0.2), paper loss", {"mix": [{"name": "reverse_kl", "weight": 1.0},
                                                        {"name": "cross_entropy", "weight": 1.0}]},
         {"kind": "kid", "kid_mask_ratio": 0.2}),
    ]
    results = []
    for label, objective, regime in rows:
        name = regime["kind"] + ("-ce" if objective == "cross_entropy" and regime["kind"] == "fixed" else "")
        name += "-first" if regime.get("scrg_selection") == "first" else ""
        name += "-paper-loss" if isinstance(objective, dict) else ""
        cfg = task_run_config(out, f"students/{name}", student=inits["student-init"], teacher=teacher_dir,
                              objective=objective, regime=regime, steps=args.steps, batch=args.batch, lr=3e-3,
                              warmup=20, task=task, test_examples=args.test_examples,
                              max_new_tokens=args.max_new_tokens, cache=cache)
        m = run_task(cfg, splits=student_splits, show_progress=False)
        g = m["generation"]
        objective_name = objective if isinstance(objective, str) else "reverse_kl + cross_entropy"
        results.append({"regime": label, "objective": objective_name, **g, "train_seconds": m["train_seconds"],
                        "validation_loss": m["validation"].get("loss"), "source_stats": m["source_stats"]})
        print(f"  {label:30s} ROUGE-L {g['rouge_l']:.4f}  EM {g['exact_match']:.4f}  "
              f"teacher ll {g.get('teacher_logprob_per_token', float('nan')):.3f}  NLL {g['response_nll']:.3f}  "
              f"{m['train_seconds']:.0f}s", flush=True)

    student_params = count_parameters(load_causal_lm(inits["student-init"]))
    teacher_params = count_parameters(load_causal_lm(teacher_dir))
    tg = teacher_metrics["generation"]
    lines = [
        f"Task kjv_continue (KJV; prompt: reference + a verse's first 5 words; reference answer: the next 3 words). "
        f"Teacher trained on {len(splits['train'])} training pairs, students on a {len(student_splits['train'])}-pair "
        f"subset; {tg['n']} test prompts (test-split chapters), greedy decoding (max {args.max_new_tokens} new tokens).",
        f"Teacher {teacher_params / 1e6:.2f}M params ({args.teacher_steps} steps x {args.batch}); student "
        f"{student_params / 1e6:.2f}M params, {args.steps} steps x {args.batch} for every regime, torch threads {args.threads}.",
        "",
        "| regime | objective | ROUGE-L | exact match | teacher log-lik of answers (nats/token) | test reference NLL | "
        "val response NLL (trainer) | train wall s |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (reference) | cross_entropy | {tg['rouge_l']:.4f} | {tg['exact_match']:.4f} | - | "
        f"{tg['response_nll']:.3f} | - | {teacher_metrics['train_seconds']:.0f} |",
    ]
    for r in results:
        lines.append(f"| {r['regime']} | {r['objective']} | {r['rouge_l']:.4f} | {r['exact_match']:.4f} | "
                     f"{r.get('teacher_logprob_per_token', float('nan')):.3f} | {r['response_nll']:.3f} | "
                     f"{r['validation_loss']:.3f} | {r['train_seconds']:.0f} |")
    load_after = os.getloadavg()
    lines += ["", f"Sequence-level KD's one-off teacher generation: {seqkd_generation_seconds:.0f}s "
                  f"({report.requested} answers generated, {report.already_stored} reused). "
                  f"Bench total {time.perf_counter() - t_start:.0f}s; load average (1/5/15 min) "
                  f"{'/'.join(f'{x:.2f}' for x in load_before)} at start, {'/'.join(f'{x:.2f}' for x in load_after)} at end."]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"rows": results, "teacher": teacher_metrics, "args": vars(args),
                                                  "seqkd_generation_seconds": seqkd_generation_seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
