#!/usr/bin/env python
"""Offline teacher cache and MiniPLM difference sampling on the real KJV Bible, measured in one run.

Part ``cache`` (default):

1. writes a k=128 float16 top-k cache of the teacher over the whole KJV training split (write throughput),
   derives the k=32 and k=8 caches from it without running the teacher (``shrink_teacher_cache``), and
   writes low-rank caches with k=128 (the ``cache.mode`` default) and k=64 principal components, a hybrid
   k=32 cache (exact head + sampled tail) and a sampled k=32 cache (random-sampling KD);
2. bytes per token of each cache, on disk, against dense float16 logits (2 * V bytes), also at V = 32k;
   and what a top-k cache keeps of the teacher on the validation split (targets outside the top-k,
   residual mass, perplexity of the teacher completed with a uniform tail, the only completion that does
   not depend on a student);
3. read throughput of ``TeacherCache.chunked_signal`` (random batches of 16 blocks, memory-mapped) against what
   the training loop consumes (tokens per second of a cache-distillation step);
4. students (the demo's 1.5M GPT-2 student and recipe; objective forward KL, or with ``--objective mix``
   0.5 forward KL + 0.5 cross-entropy) distilled from each top-k cache (default uniform tail; k=32 also
   with the student-shaped tail), from the low-rank, hybrid and sampled caches (the default low-rank cache
   also with its logits rebuilt by a float32 product instead of the default, bfloat16 on CPUs that multiply
   it natively; the rounding's KL is printed beside the projection's), and from the live teacher,
   plus the label-only twin: validation perplexity on the whole validation split;
5. step time, label-only vs cache vs live teacher, measured interleaved (one step of each in turn, so
   a changing machine load hits all alike), median over the measured rounds.

Part ``miniplm``: a small reference model (the student preset, pretrained briefly on the training
split), difference sampling of the training split with the teacher (keep the top 50%), then students
pretrained with the same token budget on the refined corpus, on the full training split and on a
random 50% (control); validation perplexity on the full corpus's validation split.

The teacher is the demo teacher when ``lmdistill demo`` has cached it, else a bench teacher (the demo
teacher recipe, fewer steps) pretrained once and reused. Usage::

    python bench/cache.py                  # part cache (about 15 minutes on 2 idle cores)
    python bench/cache.py --part miniplm   # part miniplm
    python bench/cache.py --part timing    # step times and reads only, on the caches of a --part cache --keep run
    python bench/cache.py --part all --threads 1 --objective mix
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH_TEACHER_STEPS = 400
# caches written directly by the teacher besides the top-k ones: (mode, k)
OTHER_CACHES = [("lowrank", 128), ("lowrank", 64), ("hybrid", 32), ("sampled", 32)]


def other_cache_paths(out: Path) -> dict[str, Path]:
    """Name -> directory of each of :data:`OTHER_CACHES` under ``out``."""
    return {f"cache k={k}, {mode}": out / f"cache-k{k}-{mode}" for mode, k in OTHER_CACHES}


# the default low-rank cache with its logits rebuilt by a float32 product instead of the default ("auto":
# bfloat16 where the CPU multiplies it natively), for the price of that rounding in quality and time
FP32_LOWRANK = "cache k=128, lowrank, fp32 product"


def fp32_lowrank_section(others: dict[str, Path]) -> dict:
    return {"cache": str(others["cache k=128, lowrank"]), "logits_dtype": "float32"}


def product_rounding_kl(path: Path, n_blocks: int = 256) -> tuple[str, float, float]:
    """The dtype of a low-rank cache's default logits product here, and the mean and 99th percentile KL per token
    of the float32 product's distribution to it (0 when that dtype is float32), on the cache's first blocks."""
    import torch

    from lmdistill.teachers.cache import TeacherCache

    default, fp32 = TeacherCache(path, verify="first_use"), TeacherCache(path, verify="first_use", logits_dtype="float32")
    blocks = torch.arange(min(n_blocks, default.n_blocks))
    with torch.no_grad():
        ref = torch.log_softmax(fp32.block_logits(blocks).double(), -1)
        got = torch.log_softmax(default.block_logits(blocks).double(), -1)
        kl = (ref.exp() * (ref - got)).sum(-1)
    return str(default.logits_layer()[0]).replace("torch.", ""), float(kl.mean()), float(kl.quantile(0.99))


BLOCK = 128
BATCH = 16
TIMED_STEPS = 2  # consecutive timed steps per visit of a step kind (after one untimed step)


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_teacher(cache_root: Path) -> tuple[Path, str]:
    """The demo teacher when `lmdistill demo` has cached one, else a briefly pretrained bench teacher
    (same preset and recipe as the demo teacher, fewer steps), trained once and reused."""
    from lmdistill.report.demo import demo_teacher_dir, recipe

    demo = demo_teacher_dir(cache_root / "demo") / "final"
    if (demo / "model.safetensors").exists():
        return demo, f"demo teacher {demo}"
    from lmdistill.config import validate_config
    from lmdistill.train.run import run_training

    raw = recipe("demo_teacher")
    raw["train"]["steps"] = BENCH_TEACHER_STEPS
    raw["checkpoint"] = {"every": 100, "keep": 1}
    key = hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = cache_root / "bench" / f"cache-teacher-{key}"
    final = run_dir / "final"
    if not (final / "model.safetensors").exists():
        raw["output_dir"] = str(run_dir)
        config = validate_config(raw, "bench teacher")
        log(f"pretraining a bench teacher ({config.student.preset}, {BENCH_TEACHER_STEPS} steps) -> {final}")
        resume = (run_dir / "checkpoints" / "latest").exists()
        run_training(config, resume=resume, overwrite=not resume, show_progress=False)
    return final, f"bench teacher {final} (demo teacher recipe, {BENCH_TEACHER_STEPS} pretraining steps)"


OBJECTIVES = {
    "forward_kl": "forward_kl",
    "mix": {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]},
}


def student_config(output: Path, teacher_dir: Path, teacher: dict | None, steps: int, chunked: bool | str = "auto",
                   corpus: str = "kjv", objective: str | dict = "forward_kl"):
    """The demo student recipe (1.5M GPT-2, seed 0; objective forward KL or 0.5 forward KL + 0.5 CE, keys of
    :data:`OBJECTIVES`, or any objective config given as a dict) with a
    teacher section, or its label-only twin. ``chunked``: train.chunked_loss (default "auto", the library's
    default: the chunked loss whenever the objective and models allow it)."""
    from lmdistill.config import validate_config
    from lmdistill.report.demo import recipe

    raw = recipe("demo_distill" if teacher is not None else "demo_label_only")
    raw["output_dir"] = str(output)
    raw["data"]["corpus"] = corpus
    if teacher is not None:
        raw["teacher"] = teacher
        raw["objective"] = OBJECTIVES[objective] if isinstance(objective, str) else objective
    else:
        raw["tokenizer"] = {"path": str(teacher_dir)}
    raw["train"].update(steps=steps, chunked_loss=chunked, log_every=max(1, steps // 10))
    raw["eval"] = {"every": 10**9, "max_batches": None, "batch_size": 16}  # one evaluation, on the whole split
    raw["checkpoint"] = {"every": 10**9, "keep": 1}
    return validate_config(raw, f"bench {output.name}")


def objective_label(objective: str) -> str:
    return "forward KL" if objective == "forward_kl" else "0.5 forward KL + 0.5 cross-entropy"


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- part cache
def completion_diagnostics(teacher, data, ks: list[int]) -> list[dict[str, Any]]:
    """How much of the teacher a top-k cache keeps, on the validation split: share of targets outside the
    top-k, mean residual mass, and the perplexity of the teacher completed with the residual spread uniformly
    over the other tokens (the default; the student-shaped tail depends on the student) against the full teacher's."""
    import torch

    from lmdistill.data.blocks import collate
    from lmdistill.losses import SparseTeacher

    val = data.blocks("validation")
    vocab = len(data.tokenizer)
    sums = {k: [0.0, 0.0, 0.0] for k in ks + [vocab]}
    n = 0
    with torch.no_grad():
        for b in range(0, len(val), BATCH):
            batch = collate([val[i] for i in range(b, min(b + BATCH, len(val)))])
            labels = batch["labels"].reshape(-1)
            keep = labels != -100
            logits = teacher(input_ids=batch["input_ids"]).logits.reshape(-1, vocab)[keep]
            labels = labels[keep]
            n += labels.numel()
            for k, acc in sums.items():
                sparse = SparseTeacher.from_logits(logits, k)
                acc[0] += -float(sparse.to_dense_log_probs(vocab).gather(-1, labels[:, None]).sum())
                acc[1] += float((~(sparse.indices == labels[:, None]).any(-1)).sum())
                acc[2] += float(sparse.residual.sum())
    full = math.exp(sums[vocab][0] / n)
    return [{"k": k, "outside": acc[1] / n, "residual": acc[2] / n, "ppl": math.exp(acc[0] / n),
             "rel": (math.exp(acc[0] / n) - full) / full * 100} for k, acc in sums.items()]


def step_times_and_reads(caches: dict[int, Path], others: dict[str, Path], teacher_dir: Path, out: Path,
                         timing_rounds: int, corpus: str,
                         objective: str) -> tuple[dict[str, float], dict[str, str], dict[str, float]]:
    """Median step time of each step kind (interleaved rounds of back-to-back steps), its loss path, and the caches' read
    throughput (tokens/s of ``TeacherCache.chunked_signal``, what a training step on the default chunked path
    reads, on random batches of 16 blocks, memory-mapped; for sparse caches it equals ``signal``, for a
    low-rank cache it is the coordinates, whose logits the loss builds chunk by chunk)."""
    import numpy as np
    import torch

    from lmdistill.teachers.cache import TeacherCache
    from lmdistill.train.run import build_trainer

    # ---- step time, interleaved
    # default loss path (train.chunked_loss: auto) for every kind, plus the plain full-logits path for two
    timed: list[tuple[str, dict | None, bool | str]] = [
        ("label-only", None, "auto"), ("cache k=8", {"cache": str(caches[8])}, "auto"),
        ("cache k=32", {"cache": str(caches[32])}, "auto"), ("cache k=128", {"cache": str(caches[128])}, "auto"),
        ("cache k=32, student tail", {"cache": str(caches[32]), "tail": "student"}, "auto"),
        *[(name, {"cache": str(path)}, "auto") for name, path in others.items()],
        (FP32_LOWRANK, fp32_lowrank_section(others), "auto"),
        ("live teacher", {"path": str(teacher_dir)}, "auto"),
        ("label-only, plain loss", None, False), ("cache k=32, plain loss", {"cache": str(caches[32])}, False),
    ]
    trainers = []
    for name, section, chunked in timed:
        cfg = student_config(out / "timing" / name.replace(" ", "_").replace(",", "").replace("=", ""), teacher_dir,
                             section, steps=10**6, chunked=chunked, corpus=corpus, objective=objective)
        trainers.append((name, build_trainer(cfg, show_progress=False, overwrite=True)[0]))
    from lmdistill.losses.fused import compile_enabled

    kernels = "compiled loss kernels" if compile_enabled() else "eager loss kernels (LMDISTILL_COMPILE=0)"
    log(f"timing {len(trainers)} step kinds interleaved, {timing_rounds} rounds after 3 warm-up, {kernels}; {load_note()}")
    # each visit: one untimed step (it reloads the caches the other kinds' models evicted; a real run takes
    # its steps back to back), then TIMED_STEPS consecutive timed steps
    times: dict[str, list[float]] = {name: [] for name, _ in trainers}
    step = 0
    for r in range(3 + timing_rounds):
        for name, trainer in trainers:
            for i in range(1 + TIMED_STEPS if r >= 3 else 1):
                t0 = time.perf_counter()
                trainer.train_step(step)
                step += 1
                if r >= 3 and i > 0:
                    times[name].append(time.perf_counter() - t0)
    step_s = {name: statistics.median(v) for name, v in times.items()}
    loss_path = {name: "chunked" if trainer.use_chunked else "plain (full logits)" for name, trainer in trainers}
    del trainers

    # ---- read throughput (memory-mapped, random batches of 16 blocks)
    reads = {}
    gen = np.random.default_rng(0)
    for name, path in [(f"cache k={k}", p) for k, p in caches.items()] + list(others.items()):
        cache = TeacherCache(path)
        batches = [gen.integers(0, cache.n_blocks, BATCH) for _ in range(60)]
        for b in batches[:5]:
            cache.chunked_signal({"input_ids": torch.zeros(BATCH, BLOCK, dtype=torch.long), "block_index": torch.from_numpy(b)})
        t0 = time.perf_counter()
        for b in batches:
            cache.chunked_signal({"input_ids": torch.zeros(BATCH, BLOCK, dtype=torch.long), "block_index": torch.from_numpy(b)})
        reads[name] = len(batches) * BATCH * BLOCK / (time.perf_counter() - t0)

    return step_s, loss_path, reads


def part_cache(teacher_dir: Path, out: Path, steps: int, timing_rounds: int, corpus: str, objective: str) -> str:
    import numpy as np
    import torch

    from lmdistill.data.prepare import prepare_data
    from lmdistill.data.tokenizer import load_tokenizer
    from lmdistill.models.loading import load_causal_lm
    from lmdistill.teachers.cache import TeacherCache, ShardLayout, index_dtype, shrink_teacher_cache, write_teacher_cache
    from lmdistill.train.run import run_training

    tokenizer = load_tokenizer(teacher_dir)
    data = prepare_data(corpus, block_size=BLOCK, tokenizer=tokenizer)
    train = data.streams["train"]
    vocab = len(tokenizer)
    caches = {k: out / f"cache-k{k}" for k in (8, 32, 128)}
    for path in caches.values():
        shutil.rmtree(path, ignore_errors=True)

    log(f"writing the k=128 cache of {len(data.blocks('train'))} blocks x {BLOCK}; {load_note()}")
    teacher = load_causal_lm(teacher_dir)
    report = write_teacher_cache(caches[128], model=teacher, tokenizer=tokenizer, stream=train, block_size=BLOCK, k=128,
                                 model_name=str(teacher_dir), corpus=corpus, show_progress=False)
    write_tps = report.tokens_per_second
    # the teacher forward alone on the same batches, for the share of the write spent outside the model
    ids = torch.from_numpy(np.asarray(train.ids[: 20 * BATCH * BLOCK], dtype=np.int64).reshape(20, BATCH, BLOCK))
    with torch.no_grad():
        t0 = time.perf_counter()
        for batch in ids:
            teacher(input_ids=batch)
        forward_tps = ids.numel() / (time.perf_counter() - t0)
    diagnostics = completion_diagnostics(teacher, data, [8, 32, 128])
    shrink_seconds = {}
    for k in (32, 8):
        t0 = time.perf_counter()
        shrink_teacher_cache(caches[128], caches[k], k)
        shrink_seconds[k] = time.perf_counter() - t0
    others = other_cache_paths(out)
    other_write_tps: dict[str, float] = {}
    for (mode, k), (name, path) in zip(OTHER_CACHES, others.items()):
        shutil.rmtree(path, ignore_errors=True)
        report = write_teacher_cache(path, model=teacher, tokenizer=tokenizer, stream=train, block_size=BLOCK,
                                     k=k, mode=mode, model_name=str(teacher_dir), corpus=corpus)
        other_write_tps[name] = report.tokens_per_second
    log(f"caches written (write {write_tps:,.0f} tokens/s, teacher forward alone {forward_tps:,.0f} tokens/s); {load_note()}")

    # ---- students: live teacher, each cache, label-only (same recipe, seed and steps)
    variants: list[tuple[str, dict | None]] = [("live teacher", {"path": str(teacher_dir)})]
    # low-rank (dense logits), hybrid (exact head + sampled tail), sampled (random-sampling KD)
    variants += [(name, {"cache": str(path)}) for name, path in others.items()]
    variants += [(FP32_LOWRANK, fp32_lowrank_section(others))]
    variants += [(f"cache k={k}", {"cache": str(caches[k])}) for k in (128, 32, 8)]
    # the residual shared in proportion to the student's probabilities instead of the default even spread
    variants += [("cache k=32, student tail", {"cache": str(caches[32]), "tail": "student"})]
    variants += [("label-only", None)]
    quality: dict[str, dict[str, Any]] = {}
    for name, section in variants:
        cfg = student_config(out / "students" / name.replace(" ", "_").replace("=", ""), teacher_dir, section, steps,
                             corpus=corpus, objective=objective)
        log(f"student: {name}, {steps} steps; {load_note()}")
        result = run_training(cfg, overwrite=True, show_progress=False)
        quality[name] = {**result.final_metrics, "train_seconds": result.train_seconds,
                         "train_tokens_per_second": result.tokens_per_second}

    step_s, loss_path, reads = step_times_and_reads(caches, others, teacher_dir, out, timing_rounds, corpus, objective)

    # ---- tables
    tokens_per_step = BATCH * BLOCK
    storage_rows = []
    fidelity_rows = []
    for name, path in [(f"cache k={k}", caches[k]) for k in (8, 32, 128)] + list(others.items()):
        cache = TeacherCache(path, verify="first_use")
        k = cache.k
        on_disk = cache.manifest["total_bytes"] / (cache.n_blocks * BLOCK)
        consume = tokens_per_step / step_s[name]
        if name in others:
            write = f"{other_write_tps[name]:,.0f}"
        else:
            write = f"{write_tps:,.0f}" if k == 128 else f"shrunk from k=128 in {shrink_seconds[k]:.1f}s"
        if cache.mode == "lowrank":  # k int8 codes + a float16 scale, whatever the vocabulary
            bpt32k = cache.bytes_per_token
            f = cache.manifest["projection"]["fidelity"]
            product, rounding_kl, rounding_p99 = product_rounding_kl(path)
            fidelity_rows.append({"cache": name[6:], "kl": f["kl_mean_nats"], "p99": f["kl_p99_nats"],
                                  "top1": f["top1_agreement"], "tokens": f["tokens"], "product": product,
                                  "rkl": rounding_kl, "rp99": rounding_p99})
        else:
            bpt32k = ShardLayout.bytes_per_token(k, "float16", index_dtype(32768).name)
        kind = "int8 codes + float16 scale" if cache.mode == "lowrank" else f"float16, {cache.manifest['index_dtype']} ids"
        storage_rows.append({
            "cache": f"{name[6:]}, {kind}",
            "bpt": cache.bytes_per_token, "disk": on_disk, "dense": 2 * vocab, "ratio": 2 * vocab / cache.bytes_per_token,
            "bpt32k": bpt32k, "ratio32k": 2 * 32768 / bpt32k,
            "size_mb": cache.manifest["total_bytes"] / 1e6,
            "write": write, "read": reads[name], "consume": consume, "headroom": reads[name] / consume,
        })
    live_ppl = quality["live teacher"]["perplexity"]
    label_s = step_s["label-only"]
    quality_rows = []
    for name, _ in variants:
        q = quality[name]
        quality_rows.append({
            "student": name, "ppl": q["perplexity"], "rel": (q["perplexity"] - live_ppl) / live_ppl * 100,
            "bpb": q["bits_per_byte"], "step": step_s[name], "ratio": step_s[name] / label_s,
            "train_s": q["train_seconds"],
        })
    timing_rows = [{"kind": name, "path": loss_path[name], "step": s,
                    "ratio": s / (step_s["label-only, plain loss"] if "plain loss" in name else label_s)}
                   for name, s in step_s.items()]
    t1 = markdown(storage_rows, [
        ("cache", "cache", ""), ("bpt", "bytes/token", "d"), ("disk", "on disk /token", ".1f"),
        ("dense", f"dense fp16 /token (V={vocab})", "d"), ("ratio", "smaller by", ".0f"),
        ("bpt32k", "bytes/token at V=32k", "d"), ("ratio32k", "smaller by at 32k", ".0f"), ("size_mb", "MB", ".0f"),
        ("write", "write tokens/s", ""), ("read", "read tokens/s", ",.0f"),
        ("consume", "training consumes tokens/s", ",.0f"), ("headroom", "read / consumption", ".0f"),
    ])
    t2 = markdown(quality_rows, [
        ("student", "student (1.5M)", ""), ("ppl", "val perplexity", ".3f"), ("rel", "vs live (%)", "+.2f"),
        ("bpb", "val bits/byte", ".4f"), ("step", "step s (median)", ".3f"), ("ratio", "step / label-only", ".2f"),
        ("train_s", "train s", ".0f"),
    ])
    t4 = markdown(diagnostics, [("k", "k", "d"), ("outside", "val targets outside top-k", ".3f"),
                                ("residual", "mean residual mass", ".3f"), ("ppl", "completed teacher val ppl", ".2f"),
                                ("rel", "vs full teacher (%)", "+.1f")])
    t5 = markdown(fidelity_rows, [("cache", "low-rank cache", ""), ("kl", "held-out KL(teacher || cache) nats/token", ".2e"),
                                  ("p99", "99th percentile", ".2e"), ("top1", "top-1 agreement", ".4f"),
                                  ("tokens", "held-out tokens", ",d"), ("product", "logits product here", ""),
                                  ("rkl", "its rounding: KL(fp32 product || it) nats/token", ".2e"),
                                  ("rp99", "99th percentile", ".2e")])
    t3 = markdown(timing_rows, [("kind", "step kind", ""), ("path", "loss path", ""), ("step", "median s/step", ".3f"),
                                ("ratio", "vs label-only (same loss path)", ".2f")])
    n_tokens = len(data.blocks("train")) * BLOCK
    return (
        f"### Teacher cache: storage and throughput ({corpus} training split, {n_tokens:,} tokens, block {BLOCK})\n\n{t1}\n\n"
        f"Teacher forward alone: {forward_tps:,.0f} tokens/s (the write includes it).\n\n"
        f"### What a low-rank cache keeps of this teacher (measured at build time on held-out blocks; the product's "
        f"rounding on the cache's first 256 blocks)\n\n{t5}\n\n"
        f"### What a top-k cache keeps of this teacher (validation split; k = {vocab} is the full teacher)\n\n{t4}\n\n"
        f"### Students ({objective_label(objective)}) trained {steps} steps (batch {BATCH} x {BLOCK}); whole validation "
        f"split ({quality['live teacher']['tokens']:,} tokens)\n\n{t2}\n\n"
        f"### Step time, interleaved ({timing_rounds} rounds of 1 untimed + {TIMED_STEPS} timed steps per kind)\n\n{t3}\n"
    )


def part_timing(teacher_dir: Path, out: Path, timing_rounds: int, corpus: str, objective: str) -> str:
    """Only the step times and read throughput, on the caches a ``--part cache --keep`` run left in ``out``."""
    caches = {k: out / f"cache-k{k}" for k in (8, 32, 128)}
    others = other_cache_paths(out)
    missing = [str(p) for p in [*caches.values(), *others.values()] if not (p / "manifest.json").exists()]
    if missing:
        raise SystemExit(f"--part timing needs the caches of a `--part cache --keep` run with the same --output; missing: {missing}")
    step_s, loss_path, reads = step_times_and_reads(caches, others, teacher_dir, out, timing_rounds, corpus, objective)
    label_s = step_s["label-only"]
    rows = [{"kind": name, "path": loss_path[name], "step": t,
             "ratio": t / (step_s["label-only, plain loss"] if "plain loss" in name else label_s),
             "consume": BATCH * BLOCK / t} for name, t in step_s.items()]
    table = markdown(rows, [("kind", "step kind", ""), ("path", "loss path", ""), ("step", "median s/step", ".3f"),
                            ("ratio", "vs label-only (same loss path)", ".2f"), ("consume", "tokens/s consumed", ",.0f")])
    read_rows = [{"k": name, "read": r, "consume": BATCH * BLOCK / step_s[name],
                  "headroom": r / (BATCH * BLOCK / step_s[name])} for name, r in reads.items()]
    reads_table = markdown(read_rows, [("k", "cache", ""), ("read", "read tokens/s", ",.0f"),
                                       ("consume", "training consumes tokens/s", ",.0f"), ("headroom", "read / consumption", ".0f")])
    return (f"### Step time, interleaved ({timing_rounds} rounds of 1 untimed + {TIMED_STEPS} timed steps per kind; "
            f"{objective_label(objective)})\n\n{table}\n\n"
            f"### Cache reads vs training consumption\n\n{reads_table}\n")


# --------------------------------------------------------------------------------------- part miniplm
def part_miniplm(teacher_dir: Path, out: Path, steps: int, reference_steps: int, window: int, stride: int,
                 corpus: str) -> str:
    import numpy as np

    from lmdistill.config import validate_config
    from lmdistill.data.blocks import tokenize_documents
    from lmdistill.data.cache import default_cache_dir
    from lmdistill.data.prepare import prepare_data
    from lmdistill.data.tokenizer import load_tokenizer
    from lmdistill.losses import build_objective
    from lmdistill.models.loading import build_from_preset
    from lmdistill.report.demo import recipe
    from lmdistill.selection.run import MiniPLMConfig, load_refined_documents, run_miniplm_selection
    from lmdistill.train.run import run_training
    from lmdistill.train.trainer import Trainer

    tokenizer = load_tokenizer(teacher_dir)
    data = prepare_data(corpus, block_size=BLOCK, tokenizer=tokenizer)

    # the reference model: the student preset pretrained briefly on the training split (cached)
    raw = recipe("demo_label_only")
    raw["data"]["corpus"] = corpus
    raw["tokenizer"] = {"path": str(teacher_dir)}
    raw["train"].update(steps=reference_steps, warmup_steps=min(30, reference_steps // 5))
    raw["eval"] = {"every": 10**9, "max_batches": 20, "batch_size": 16}
    raw["checkpoint"] = {"every": 10**9, "keep": 1}
    key = hashlib.sha1(json.dumps({**raw, "teacher": str(teacher_dir)}, sort_keys=True).encode()).hexdigest()[:10]
    ref_dir = Path(default_cache_dir()) / "bench" / f"miniplm-reference-{key}"
    if not (ref_dir / "final" / "model.safetensors").exists():
        raw["output_dir"] = str(ref_dir)
        log(f"pretraining the reference model ({reference_steps} steps); {load_note()}")
        run_training(validate_config(raw, "bench reference"), overwrite=True, show_progress=False)

    log(f"difference sampling of the training split (window {window}, stride {stride}); {load_note()}")
    selection = MiniPLMConfig.model_validate({
        "output_dir": str(out / "miniplm"), "data": {"corpus": corpus},
        "teacher": {"path": str(teacher_dir)}, "reference": {"path": str(ref_dir / "final")},
        "selection": {"fraction": 0.5, "window": window, "stride": stride, "batch_size": 16},
    })
    t0 = time.perf_counter()
    summary = run_miniplm_selection(selection, show_progress=False)
    select_seconds = time.perf_counter() - t0
    refined = load_refined_documents(out / "miniplm" / "refined.jsonl")
    train_docs = data.documents["train"]
    rng = np.random.default_rng(0)
    random_half = [train_docs[i] for i in sorted(rng.choice(len(train_docs), len(refined), replace=False))]

    cache_dir = Path(default_cache_dir()) / "tokens"
    streams = {
        "full training split": data.streams["train"],
        "MiniPLM refined (top 50%)": tokenize_documents(refined, tokenizer, cache_dir, "kjv-miniplm-train"),
        "random 50% (control)": tokenize_documents(random_half, tokenizer, cache_dir, "kjv-random-half-train"),
    }
    rows = []
    for name, stream in streams.items():
        raw = recipe("demo_label_only")
        raw["output_dir"] = str(out / "miniplm-students" / name.split(" ")[0])
        raw["tokenizer"] = {"path": str(teacher_dir)}
        raw["train"].update(steps=steps)
        raw["eval"] = {"every": 10**9, "max_batches": None, "batch_size": 16}
        raw["checkpoint"] = {"every": 10**9, "keep": 1}
        cfg = validate_config(raw, "bench miniplm student")
        student = build_from_preset(cfg.student.preset, tokenizer, max_positions=BLOCK, seed=cfg.train.seed)
        log(f"pretraining a student on: {name}; {load_note()}")
        trainer = Trainer(cfg, student=student, tokenizer=tokenizer, objective=build_objective("cross_entropy"),
                          train_stream=stream, validation_stream=data.streams["validation"], show_progress=False)
        result = trainer.train()
        n_train = (stream.n_tokens - 1) // BLOCK * BLOCK
        rows.append({"data": name, "docs": stream.n_documents, "tokens": n_train,
                     "epochs": steps * BATCH * BLOCK / n_train, "ppl": result.final_metrics["perplexity"],
                     "bpb": result.final_metrics["bits_per_byte"]})
    base = rows[0]["ppl"]
    for row in rows:
        row["rel"] = (row["ppl"] - base) / base * 100
    table = markdown(rows, [("data", "pretraining data", ""), ("docs", "documents", "d"), ("tokens", "tokens", ",d"),
                            ("epochs", "epochs in budget", ".2f"), ("ppl", "val perplexity (full val split)", ".3f"),
                            ("rel", "vs full (%)", "+.2f"), ("bpb", "val bits/byte", ".4f")])
    return (
        f"### MiniPLM difference sampling ({corpus}; teacher vs reference {reference_steps}-step student preset)\n\n"
        f"Scored {summary['documents']} training documents in {select_seconds:.0f}s (teacher {summary['teacher_seconds']:.0f}s, "
        f"reference {summary['reference_seconds']:.0f}s); kept {summary['kept']} "
        f"({summary['teacher_tokens_kept']:,} of {summary['teacher_tokens_total']:,} tokens); teacher "
        f"{summary['teacher_nats_per_token']:.3f} vs reference {summary['reference_nats_per_token']:.3f} nats/token on the split.\n"
        f"Students: label-only pretraining, {steps} steps x {BATCH} x {BLOCK} tokens each (the same budget).\n\n{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["cache", "miniplm", "all", "timing"], default="cache",
                        help="timing: step times and reads only, on the caches of an earlier --part cache --keep run")
    parser.add_argument("--steps", type=int, default=300, help="student steps (demo recipe: 300)")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="forward_kl",
                        help="distillation objective of the students (label-only twin: cross-entropy)")
    parser.add_argument("--timing-rounds", type=int, default=10)
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--stride", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench" / "cache")
    parser.add_argument("--keep", action="store_true", help="keep the caches and student runs")
    parser.add_argument("--teacher-only", action="store_true", help="only make sure the teacher exists")
    parser.add_argument("--teacher", type=Path, default=None, help="use this teacher directory instead")
    parser.add_argument("--corpus", default="kjv", help="corpus (default kjv; a small file for a smoke run)")
    args = parser.parse_args()

    import torch

    from lmdistill.data.cache import default_cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.teacher is not None:
        teacher_dir, teacher_note = args.teacher, f"teacher {args.teacher} (given)"
    else:
        teacher_dir, teacher_note = find_teacher(Path(default_cache_dir()))
    if args.teacher_only:
        print(teacher_note)
        return
    args.output.mkdir(parents=True, exist_ok=True)
    header = (f"Corpus: {args.corpus}. Teacher: {teacher_note}\nTorch threads: {torch.get_num_threads()}; at start: {load_note()}\n")
    log(header)
    sections = []
    try:
        if args.part in ("cache", "all"):
            sections.append(part_cache(teacher_dir, args.output, args.steps, args.timing_rounds, args.corpus,
                                       args.objective))
            print("\n" + sections[-1], flush=True)  # printed at once: a later part's crash cannot lose it
        if args.part == "timing":
            sections.append(part_timing(teacher_dir, args.output, args.timing_rounds, args.corpus, args.objective))
            print("\n" + sections[-1], flush=True)
        if args.part in ("miniplm", "all"):
            sections.append(part_miniplm(teacher_dir, args.output, args.steps, args.reference_steps, args.window,
                                         args.stride, args.corpus))
            print("\n" + sections[-1], flush=True)
    finally:
        if not args.keep and args.part != "timing":
            shutil.rmtree(args.output, ignore_errors=True)
    footer = f"Total {time.perf_counter() - start:.0f}s; at the end: {load_note()}"
    text = header + "\n" + "\n".join(sections) + "\n" + footer
    print("\n" + text)


if __name__ == "__main__":
    main()
