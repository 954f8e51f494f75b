"""Data-centric distillation, three tables in one run: DDK domain mixtures, performance-guided active distillation,
and the teacher-hacking protocol. Everything is small enough for 2 shared CPU cores; read the numbers as a small
replication of each paper's setting, not of its scale.

1. **DDK** (arXiv 2407.16154). Four domains: the KJV Bible, GCIDE, the Jargon File and the fortunes, each capped to a
   hash-chosen subset (sizes stay unequal). One teacher is pretrained on all four (uniform mixture, cross-entropy,
   reused from the output directory), one student initialisation is then distilled three times with DDK's loss
   (cross-entropy + 0.2 forward KL, T = 1) at equal steps and tokens: uniform mixture, size-proportional mixture,
   DDK (K = ``--interval`` steps, alpha = 0.5, 16 validation blocks per domain). Reported: bits per byte on each
   domain's *test* blocks (DDK steers by validation perplexities), their mean and worst, and DDK's weights.
2. **PGKD** (arXiv 2411.05045) on the fortunes classification task (6 fortune files as classes; 4 labelled
   examples per class to start, 25 per class for validation, 40 for test). The student is frozen MiniLM-L6
   embeddings + a linear head. No generative LLM runs offline here, so the teacher is a *retrieval teacher* served
   through the real OpenAI-compatible server (:class:`~lmdistill.selection.scripted.FunctionLM`): for every
   example a query shows it writes back the nearest unused example of that example's true class from a labelled
   pool (train-split fortunes the student never sees). PGKD (hard negatives, most confident first), the random
   selection baseline and robust selection (after RAD) get the same budget of teacher queries; reported: validation
   and test accuracy per round.
3. **Teacher hacking** (arXiv 2502.02671). Oracle: the bench's largest pretrained model (table 1's teacher). Teacher:
   a smaller model distilled from the oracle (forward KL on oracle samples). Student: a tiny model, first fine-tuned
   on oracle samples (stage 1), then distilled from the teacher with forward KL (stage 2) on: a fixed offline dataset
   (64 prompts x 1 teacher sample), a less diverse one of the same size (16 prompts x 4 samples), fresh teacher
   samples for the same 64 prompts at every step (online, teacher), and the student's own samples (online,
   student). The monitor logs the proxy metric (sequence KL teacher -> student) and the golden metric (oracle ->
   student) on 32 validation prompts; flags as defined in :mod:`lmdistill.eval.monitor`.

    .venv/bin/python bench/data_centric.py            # full run (about 30-40 min on 2 heavily shared cores)
    .venv/bin/python bench/data_centric.py --quick    # pipeline smoke test (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
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
from lmdistill.data.documents import Document, split_of  # noqa: E402
from lmdistill.eval.monitor import MonitorConfig, MonitoredEvaluator, plot_monitor  # noqa: E402
from lmdistill.generation.batching import encode_examples, encode_prompts, pad_id_of  # noqa: E402
from lmdistill.generation.config import BlackBoxConfig, SamplingConfig  # noqa: E402
from lmdistill.generation.run import build_task_run  # noqa: E402
from lmdistill.generation.run_config import TaskRunConfig  # noqa: E402
from lmdistill.generation.sampling import SamplingParams, generate  # noqa: E402
from lmdistill.generation.server import ModelServer  # noqa: E402
from lmdistill.generation.sources import OnPolicySource  # noqa: E402
from lmdistill.models.loading import build_from_preset, count_parameters, load_causal_lm  # noqa: E402
from lmdistill.report.plots import markdown_table  # noqa: E402
from lmdistill.seeds import derived_seed  # noqa: E402
from lmdistill.selection.active import ActiveConfig, prompt_examples, run_active  # noqa: E402
from lmdistill.selection.classify import ClassTaskConfig, StudentConfig, build_class_task, load_encoder  # noqa: E402
from lmdistill.selection.ddk import FirstBlocks, plot_weights  # noqa: E402
from lmdistill.selection.ddk_run import MixtureRunConfig, run_mixture  # noqa: E402
from lmdistill.selection.scripted import FunctionLM  # noqa: E402
from lmdistill.train.mixture_source import evaluate_domains  # noqa: E402

DOMAIN_CAPS = {"kjv": 400, "gcide": 8000, "jargon": 600, "fortunes": 1200}  # unequal sizes, as real domains are
VOCAB = 2048
TEACHER_SHAPE = {"n_layer": 3, "n_embd": 128, "n_head": 4}
STUDENT_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 4}
HACK_TEACHER_SHAPE = {"n_layer": 2, "n_embd": 96, "n_head": 4}
HACK_STUDENT_SHAPE = {"n_layer": 1, "n_embd": 48, "n_head": 4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-data-centric")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=500, help="the 4-domain teacher (also the hacking oracle)")
    p.add_argument("--steps", type=int, default=240, help="student steps of each mixture")
    p.add_argument("--interval", type=int, default=40, help="DDK's K")
    p.add_argument("--test-blocks", type=int, default=48, help="test blocks per domain in table 1")
    p.add_argument("--budget", type=int, default=12, help="PGKD teacher queries")
    p.add_argument("--hack-steps", type=int, default=240, help="stage-2 student steps per data regime")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes on shared cores)")
    p.add_argument("--quick", action="store_true", help="tiny sizes to check the pipeline")
    p.add_argument("--tables", default="ddk,pgkd,hacking", help="which tables (pgkd alone uses a BPE of the fortunes)")
    return p.parse_args()


def _model_dir(path: Path, tokenizer, preset: str, shape: dict, seed: int, positions: int) -> Path:
    path = path.with_name(f"{path.name}-{shape['n_layer']}x{shape['n_embd']}-v{len(tokenizer)}")  # a new shape, a new dir
    if not (path / "model.safetensors").exists():
        model = build_from_preset(preset, tokenizer, max_positions=positions, seed=seed, overrides=shape)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _mixture_config(out: Path, name: str, args, *, student: Path, teacher: Path | None, policy: str, steps: int,
                    objective, cache: Path, monitor: dict | None = None) -> MixtureRunConfig:
    raw = {
        "output_dir": str(out / name),
        "domains": [{"name": n, "source": n, "max_documents": cap} for n, cap in DOMAIN_CAPS.items()],
        "data": {"block_size": args.block, "cache_dir": str(cache)},
        "tokenizer": {"vocab_size": VOCAB},
        "student": {"path": str(student)},
        "objective": objective,
        "mixture": {"policy": policy, "interval": args.interval, "validation_blocks": 16},
        "train": {"steps": steps, "batch_size": args.batch, "lr": 3e-3, "warmup_steps": max(1, steps // 20),
                  "log_every": max(1, steps // 10), "seed": 0},
        "eval": {"every": 10**6, "max_batches": 2, "batch_size": 16},
        "checkpoint": {"every": 10**6, "keep": 1},
    }
    if teacher is not None:
        raw["teacher"] = {"path": str(teacher)}
    return validate_config(raw, f"bench:{name}", MixtureRunConfig)


# ------------------------------------------------------------------------------------------------ table 1
def table_ddk(args, out: Path, cache: Path) -> tuple[str, dict, Path, object]:
    teacher_dir = out / "teacher" / "final"
    spec = {"caps": DOMAIN_CAPS, "shape": TEACHER_SHAPE, "vocab": VOCAB, "steps": args.teacher_steps, "block": args.block,
            "batch": args.batch}
    spec_file = out / "teacher" / "spec.json"
    data = _domain_data(args, cache)
    tokenizer = data.tokenizer
    if not (teacher_dir.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec):
        init = _model_dir(out / "teacher-init", tokenizer, "gpt2-teacher-7m", TEACHER_SHAPE, 1, 128)
        cfg = _mixture_config(out, "teacher", args, student=init, teacher=None, policy="uniform", steps=args.teacher_steps,
                              objective="cross_entropy", cache=cache)
        start = time.perf_counter()
        run_mixture(cfg, overwrite=True, show_progress=False)
        spec_file.write_text(json.dumps(spec))
        print(f"teacher: {args.teacher_steps} steps on the uniform 4-domain mixture in {time.perf_counter() - start:.0f}s",
              flush=True)
    else:
        print(f"teacher reused from {teacher_dir}", flush=True)
    student_init = _model_dir(out / "student-init", tokenizer, "gpt2-student-1.5m", STUDENT_SHAPE, 2, 128)
    objective = {"mix": [{"name": "cross_entropy", "weight": 1.0}, {"name": "forward_kl", "weight": 0.2}]}
    results, histories = {}, {}
    for policy in ("uniform", "proportional", "ddk"):
        cfg = _mixture_config(out, f"mix-{policy}", args, student=student_init, teacher=teacher_dir, policy=policy,
                              steps=args.steps, objective=objective, cache=cache)
        start = time.perf_counter()
        summary = run_mixture(cfg, overwrite=True, show_progress=False)
        seconds = time.perf_counter() - start
        model = load_causal_lm(Path(summary["final_model"]))
        test = _test_bpb(model, data, args)
        results[policy] = {**test, "seconds": seconds, "final_weights": summary["weights_history"][-1]["weights"]}
        histories[policy] = summary["weights_history"]
        print(f"  {policy:12s} mean bpb {test['mean']:.4f}  worst {test['worst']:.4f}  {seconds:.0f}s", flush=True)
    teacher_test = _test_bpb(load_causal_lm(teacher_dir), data, args)
    names = list(DOMAIN_CAPS)
    columns = [("mixture", "mixture", ""), *[(n, f"{n} bpb", ".4f") for n in names], ("mean", "mean bpb", ".4f"),
               ("worst", "worst bpb", ".4f"), ("weights", "final weights", ""), ("seconds", "train s", ".0f")]
    rows = [{"mixture": "teacher (reference)", **teacher_test, "weights": "-", "seconds": None}]
    for policy, r in results.items():
        rows.append({"mixture": policy, **r, "weights": " / ".join(f"{w:.2f}" for w in r["final_weights"])})
    traj = [{"step": h["step"], **{n: f"{w:.3f}" for n, w in zip(names, h["weights"])},
             **{f"r_{n}": f"{x:.2f}" for n, x in zip(names, h["ratio"])}} for h in histories["ddk"]]
    traj_cols = [("step", "after step", "")] + [(n, f"w {n}", "") for n in names] + [(f"r_{n}", f"ell_S/ell_T {n}", "")
                                                                                        for n in names]
    plot_weights(histories["ddk"], names, out / "ddk_weights.png", title="DDK weights")
    train_tokens = {n: data.streams[n]["train"].n_targets for n in names}
    header = (f"Table 1. Domain mixtures (DDK, arXiv 2407.16154): teacher {count_parameters(load_causal_lm(teacher_dir)) / 1e6:.2f}M "
              f"params ({args.teacher_steps} steps, uniform mixture), student {count_parameters(load_causal_lm(student_init)) / 1e6:.2f}M, "
              f"{args.steps} steps x {args.batch} x {args.block} tokens for every mixture, loss CE + 0.2 FKL. Training tokens "
              f"per domain: {', '.join(f'{n} {t:,}' for n, t in train_tokens.items())}. Bits per byte on the first "
              f"{args.test_blocks} test blocks of each domain.")
    text = "\n".join([header, "", markdown_table(rows, columns), "", f"DDK weight trajectory (K = {args.interval}):", "",
                      markdown_table(traj, traj_cols)])
    worst_lower = results["ddk"]["worst"] < min(results["uniform"]["worst"], results["proportional"]["worst"])
    mean_lower = results["ddk"]["mean"] < min(results["uniform"]["mean"], results["proportional"]["mean"])
    note = (f"DDK {'lowered' if worst_lower else 'did not lower'} the worst domain's bits per byte "
            f"({results['ddk']['worst']:.4f} vs uniform {results['uniform']['worst']:.4f}, proportional "
            f"{results['proportional']['worst']:.4f}) and {'lowered' if mean_lower else 'did not lower'} the mean "
            f"({results['ddk']['mean']:.4f} vs {results['uniform']['mean']:.4f}, {results['proportional']['mean']:.4f}).")
    return text, {"results": results, "histories": histories, "note": note}, teacher_dir, tokenizer


def _domain_data(args, cache: Path):
    """The four capped domains, tokenized (the BPE is trained on their training text once and cached)."""
    from lmdistill.data.domains import DomainSpec, prepare_domains

    specs = [DomainSpec(name=n, source=n, max_documents=cap) for n, cap in DOMAIN_CAPS.items()]
    return prepare_domains(specs, block_size=args.block, vocab_size=VOCAB, cache_dir=cache)


def _test_bpb(model, data, args) -> dict:
    datasets = {n: FirstBlocks(data.blocks(n, "test"), args.test_blocks) for n in data.names}
    m = evaluate_domains(model, datasets, {n: data.streams[n]["test"].bytes_per_target for n in data.names}, batch_size=16,
                         vocab_size=len(data.tokenizer))
    return {**{n: m[f"bpb/{n}"] for n in data.names}, "mean": m["bits_per_byte"], "worst": m["worst_bits_per_byte"]}


# ------------------------------------------------------------------------------------------------ table 2
class RetrievalTeacher:
    """For each example a query shows, the most similar pool example of that example's (true) class not given out
    before, written back as ``label: text`` (cosine similarity of MiniLM embeddings)."""

    def __init__(self, pool, encoder) -> None:
        self.pool = pool
        self.encoder = encoder
        self.embeddings = encoder.encode([p.text for p in pool], batch_size=64, convert_to_tensor=True)
        self.used: set[int] = set()

    def __call__(self, prompt: str) -> str:
        lines = []
        shown = prompt_examples(prompt)
        if not shown:
            return ""
        queries = self.encoder.encode([t for _, t in shown], batch_size=64, convert_to_tensor=True)
        for (label, _), q in zip(shown, queries):
            scores = self.embeddings @ q
            for i in torch.argsort(scores, descending=True).tolist():
                if self.pool[i].label == label and i not in self.used:
                    self.used.add(i)
                    lines.append(f"{label}: {self.pool[i].text}")
                    break
        return "\n".join(lines)


def table_pgkd(args, out: Path, tokenizer) -> tuple[str, dict]:
    task_cfg = ClassTaskConfig(name="fortunes", seed_per_class=4, validation_per_class=25, test_per_class=40, max_chars=300)
    task = build_class_task(task_cfg)
    pool = sorted(task["pool"], key=lambda e: derived_seed("pool", e.origin))[: (300 if args.quick else 1500)]
    encoder = load_encoder(StudentConfig())
    runs = {}
    for selection in ("hard", "random", "robust"):
        teacher = RetrievalTeacher(pool, encoder)
        server = ModelServer(FunctionLM(tokenizer, teacher), tokenizer, model_name="retrieval-teacher",
                             max_new_tokens_limit=8192).start()
        try:
            cfg = ActiveConfig.model_validate({
                "output_dir": str(out / f"pgkd-{selection}"), "task": task_cfg.model_dump(),
                "student": {"encoder": "minilm"},
                "teacher": {"blackbox": BlackBoxConfig(base_url=server.base_url, model="retrieval-teacher", api_key_env=None,
                                                       concurrency=1, timeout=600).model_dump(),
                            "sampling": SamplingConfig(greedy=True, max_new_tokens=4096).model_dump()},
                "active": {"rounds": 10, "budget": args.budget, "queries_per_round": 3, "examples_per_query": 6,
                           "hard_per_query": 4, "correct_per_query": 2, "selection": selection, "patience": 10},
            })
            for stale in ("state.json", "teacher_store.jsonl", "summary.json"):
                (out / f"pgkd-{selection}" / stale).unlink(missing_ok=True)  # the teacher's pool use is per run
            start = time.perf_counter()
            runs[selection] = run_active(cfg, encoder=encoder, task=task)
            runs[selection]["seconds"] = time.perf_counter() - start
        finally:
            server.stop()
        print(f"  PGKD {selection}: stopped ({runs[selection]['stopped']}) after {len(runs[selection]['rounds'])} rounds, "
              f"{runs[selection]['seconds']:.0f}s", flush=True)
    rows = []
    for h, r, b in zip(runs["hard"]["rounds"], runs["random"]["rounds"], runs["robust"]["rounds"]):
        rows.append({"round": h["round"], "queries": h["queries_used"], "train_hard": h["train_size"],
                     "val_hard": h["validation"]["accuracy"], "test_hard": h["test"]["accuracy"],
                     "train_random": r["train_size"], "val_random": r["validation"]["accuracy"],
                     "test_random": r["test"]["accuracy"], "train_robust": b["train_size"],
                     "val_robust": b["validation"]["accuracy"], "test_robust": b["test"]["accuracy"]})
    columns = [("round", "round", ""), ("queries", "queries used", "")]
    for key, label in (("hard", "PGKD"), ("random", "random"), ("robust", "robust (RAD)")):
        columns += [(f"train_{key}", f"{label} train size", ""), (f"val_{key}", f"{label} val acc", ".3f"),
                    (f"test_{key}", f"{label} test acc", ".3f")]
    header = (f"Table 2. Performance-guided active distillation (PGKD, arXiv 2411.05045), fortunes task "
              f"({', '.join(task['labels'])}): {len(task['seed'])} seed examples, {len(task['validation'])} validation, "
              f"{len(task['test'])} test; student MiniLM-L6 (frozen) + linear head; retrieval teacher over {len(pool)} "
              f"pool fortunes; budget {args.budget} queries, 3 per round, up to 6 examples per query; same budget for "
              "hard-negative (PGKD), random and robust (after RAD, arXiv 2210.01213) selection.")
    final_h, final_r = runs["hard"]["rounds"][-1]["test"]["accuracy"], runs["random"]["rounds"][-1]["test"]["accuracy"]
    final_b = runs["robust"]["rounds"][-1]["test"]["accuracy"]
    note = (f"At the spent budget PGKD's test accuracy is {final_h:.3f} against random selection's {final_r:.3f} "
            f"({'higher' if final_h > final_r else 'not higher'}) and robust selection's {final_b:.3f}.")
    return header + "\n\n" + markdown_table(rows, columns), {"runs": runs, "note": note}


# ------------------------------------------------------------------------------------------------ table 3
class TeacherSampleSource(OnPolicySource):
    """Online teacher data: each step's responses are fresh samples of a given model (the teacher) for the step's
    prompts (seeded by step and rank, as the on-policy source's)."""

    def __init__(self, examples, *, sampler, **kwargs) -> None:
        super().__init__(examples, lmbda=1.0, **kwargs)
        self.sampler = sampler

    def sample(self, examples, generator):
        from lmdistill.generation.batching import Example

        outputs = generate(self.sampler, [e.prompt for e in examples], eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                           params=self.params, generator=generator, vocab_size=self._vocab())
        return [Example(e.prompt, tuple(o)) for e, o in zip(examples, outputs)]


def _verse_prompts(words: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for chapter in read_kjv():
        split = split_of(chapter.doc_id)
        for _, text in chapter.meta["verses"]:
            w = text.split()
            if len(w) > words + 3:
                out[split].append(" ".join(w[:words]))
    return out


def _sample_docs(model, tokenizer, prompts: list[str], *, per_prompt: int, seed: int, max_new: int, tag: str) -> list[Document]:
    docs = []
    ids = encode_prompts(tokenizer, prompts)
    params = SamplingParams(greedy=False, temperature=1.0, max_new_tokens=max_new)
    for g in range(per_prompt):
        outs = generate(model, ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id_of(tokenizer), params=params,
                        generator=torch.Generator().manual_seed(derived_seed(seed, tag, g)), vocab_size=len(tokenizer))
        for i, (p, o) in enumerate(zip(prompts, outs)):
            text = tokenizer.decode([t for t in o if t != tokenizer.eos_token_id], skip_special_tokens=True)
            if text.strip():
                docs.append(Document.from_prompt_response(p, text, f"{tag}:{i}:{g}", tag))
    return docs


def _task_config(out: Path, name: str, *, student: Path, teacher: Path | None, objective, regime: dict, steps: int,
                 args, cache: Path, eval_every: int) -> TaskRunConfig:
    raw = {
        "output_dir": str(out / name), "cache_dir": str(cache), "student": {"path": str(student)}, "objective": objective,
        "regime": {"max_length": 48, **regime},
        "train": {"steps": steps, "batch_size": args.batch, "lr": 3e-3, "warmup_steps": max(1, steps // 20),
                  "log_every": max(1, steps // 10), "seed": 0},
        "eval": {"every": eval_every, "max_batches": 2, "batch_size": 16},
        "checkpoint": {"every": 10**6, "keep": 1},
        "generation": {"split": "validation", "max_examples": 8, "batch_size": 8,
                       "sampling": {"greedy": True, "max_new_tokens": 8}},
    }
    if teacher is not None:
        raw["teacher"] = {"path": str(teacher)}
    return validate_config(raw, f"bench:{name}", TaskRunConfig)


def _train_task(cfg: TaskRunConfig, splits: dict, *, monitor: MonitorConfig | None = None, val_prompts=None,
                source_factory=None) -> tuple[Path, list[dict]]:
    import shutil

    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    run = build_task_run(cfg, splits=splits, show_progress=False)
    trainer = run.trainer
    if source_factory is not None:
        trainer.source = source_factory(run)
        trainer.source.bind(trainer)
    if monitor is not None:
        trainer.evaluator = MonitoredEvaluator(monitor, base=trainer.evaluator, prompts=val_prompts, plot=False)
    try:
        result = trainer.train()
        final = trainer.save_final()
    finally:
        trainer.close()
    return final, [h for h in result.history if h.get("kind") == "eval"]


def table_hacking(args, out: Path, cache: Path, oracle_dir: Path, tokenizer) -> tuple[str, dict]:
    words, max_new = 6, 24
    prompts = _verse_prompts(words)
    oracle = load_causal_lm(oracle_dir).eval()
    n_oracle = 256 if args.quick else 768
    train_prompts = prompts["train"][:: max(1, len(prompts["train"]) // n_oracle)][:n_oracle]
    val_prompts = prompts["validation"][:: max(1, len(prompts["validation"]) // 32)][:32]
    start = time.perf_counter()
    oracle_docs = _sample_docs(oracle, tokenizer, train_prompts, per_prompt=1, seed=0, max_new=max_new, tag="oracle")
    val_docs = _sample_docs(oracle, tokenizer, val_prompts, per_prompt=1, seed=1, max_new=max_new, tag="oracle-val")
    print(f"  oracle data: {len(oracle_docs)} samples in {time.perf_counter() - start:.0f}s", flush=True)
    splits = {"train": oracle_docs, "validation": val_docs, "test": val_docs}
    # the teacher: distilled from the oracle (forward KL on the oracle's samples)
    teacher_init = _model_dir(out / "hack-teacher-init", tokenizer, "gpt2-student-1.5m", HACK_TEACHER_SHAPE, 3, 128)
    t_steps = 60 if args.quick else 200
    teacher_dir, _ = _train_task(_task_config(out, "hack-teacher", student=teacher_init, teacher=oracle_dir,
                                              objective="forward_kl", regime={"kind": "fixed"}, steps=t_steps, args=args,
                                              cache=cache, eval_every=10**6), splits)
    # stage 1: the student's starting point, fine-tuned on oracle samples
    student_init = _model_dir(out / "hack-student-init", tokenizer, "gpt2-student-1.5m", HACK_STUDENT_SHAPE, 4, 128)
    s_steps = 30 if args.quick else 100
    student_sft, _ = _train_task(_task_config(out, "hack-student-sft", student=student_init, teacher=None,
                                              objective="cross_entropy", regime={"kind": "fixed"}, steps=s_steps, args=args,
                                              cache=cache, eval_every=10**6), splits)
    teacher_model = load_causal_lm(teacher_dir).eval()
    many = train_prompts[:64]
    few = train_prompts[:16]
    offline_many = _sample_docs(teacher_model, tokenizer, many, per_prompt=1, seed=2, max_new=max_new, tag="t-many")
    offline_few = _sample_docs(teacher_model, tokenizer, few, per_prompt=4, seed=3, max_new=max_new, tag="t-few")
    monitor = MonitorConfig(oracle=str(oracle_dir), prompts=32, max_new_tokens=max_new, generations=1)
    val_ids = encode_prompts(tokenizer, val_prompts)
    sampling = {"temperature": 1.0, "max_new_tokens": max_new}
    eval_every = max(1, args.hack_steps // 10)
    regimes = {
        "offline: 64 prompts x 1 teacher sample": ({"kind": "fixed"}, offline_many, None),
        "offline: 16 prompts x 4 teacher samples": ({"kind": "fixed"}, offline_few, None),
        "online: teacher samples (64 prompts)": ({"kind": "fixed"}, offline_many, "teacher"),
        "online: student samples (64 prompts)": ({"kind": "on_policy", "lmbda": 1.0, "sampling": sampling}, offline_many, None),
    }
    results = {}
    for label, (regime, docs, online) in regimes.items():
        name = "hack-" + "-".join(label.replace(":", "").replace("(", "").replace(")", "").split()[:4])
        cfg = _task_config(out, name, student=student_sft, teacher=teacher_dir, objective="forward_kl", regime=regime,
                           steps=args.hack_steps, args=args, cache=cache, eval_every=eval_every)

        def teacher_source(run, docs=docs):
            tok = run.tokenizer
            return TeacherSampleSource(encode_examples(tok, docs), sampler=teacher_model, pad_id=pad_id_of(tok),
                                       eos_id=tok.eos_token_id, global_batch=args.batch, seed=0, max_length=48,
                                       params=SamplingParams(greedy=False, temperature=1.0, max_new_tokens=max_new))

        start = time.perf_counter()
        _, evals = _train_task(cfg, {**splits, "train": docs}, monitor=monitor, val_prompts=val_ids,
                               source_factory=teacher_source if online == "teacher" else None)
        history = [{"step": float(e["step"]), "proxy_kl": e["proxy_kl"], "golden_kl": e["golden_kl"]} for e in evals]
        last = evals[-1]
        results[label] = {"history": history, "teacher_hacking": bool(last["teacher_hacking"]),
                          "proxy_powerlaw_deviation": last.get("proxy_powerlaw_deviation"),
                          "proxy_departs_powerlaw": bool(last.get("proxy_departs_powerlaw", 0.0)),
                          "seconds": time.perf_counter() - start}
        print(f"  {label:42s} proxy {history[0]['proxy_kl']:.2f}->{history[-1]['proxy_kl']:.2f}  golden "
              f"{history[0]['golden_kl']:.2f}->{min(h['golden_kl'] for h in history):.2f}->{history[-1]['golden_kl']:.2f}  "
              f"hacking {results[label]['teacher_hacking']}  {results[label]['seconds']:.0f}s", flush=True)
    plot_monitor({k.split(":")[0] + k.split(":")[1][:20]: v["history"] for k, v in results.items()}, out / "hacking.png")
    rows = []
    for label, r in results.items():
        h = r["history"]
        golden = [x["golden_kl"] for x in h]
        best = min(range(len(golden)), key=golden.__getitem__)
        rows.append({"regime": label, "proxy": f"{h[0]['proxy_kl']:.2f} -> {min(x['proxy_kl'] for x in h):.2f} -> {h[-1]['proxy_kl']:.2f}",
                     "golden": f"{golden[0]:.2f} -> {golden[best]:.2f} -> {golden[-1]:.2f}", "best": int(h[best]["step"]),
                     "hack": "yes" if r["teacher_hacking"] else "no",
                     "dev": "-" if r["proxy_powerlaw_deviation"] is None else f"{r['proxy_powerlaw_deviation']:+.2f}",
                     "seconds": r["seconds"]})
    columns = [("regime", "stage-2 data", ""), ("proxy", "proxy KL first -> min -> last", ""),
               ("golden", "golden KL first -> min -> last", ""), ("best", "golden min at step", ""),
               ("hack", "teacher hacking flag", ""), ("dev", "proxy vs power law (last)", ""), ("seconds", "train s", ".0f")]
    params = {k: count_parameters(load_causal_lm(p)) / 1e6 for k, p in
              (("oracle", oracle_dir), ("teacher", teacher_dir), ("student", student_sft))}
    header = (f"Table 3. Teacher hacking (arXiv 2502.02671): oracle {params['oracle']:.2f}M params (table 1's teacher), "
              f"teacher {params['teacher']:.2f}M (forward KL to the oracle on {len(oracle_docs)} oracle samples, "
              f"{t_steps} steps), student {params['student']:.2f}M (stage 1: {s_steps} SFT steps on oracle samples). "
              f"Stage 2: {args.hack_steps} steps x {args.batch} sequences of forward KL to the teacher; prompts: a KJV verse's "
              f"first {words} words; proxy = sequence KL(teacher || student), golden = sequence KL(oracle || student) on "
              f"32 validation prompts, {max_new} sampled tokens, every {eval_every} steps.")
    hacked = [k for k, r in results.items() if r["teacher_hacking"]]
    note = ("Teacher hacking flagged for: " + (", ".join(hacked) if hacked else "none of the regimes") + ".")
    return header + "\n\n" + markdown_table(rows, columns), {"results": results, "note": note}


def main() -> int:
    args = parse_args()
    if args.quick:
        args.teacher_steps, args.steps, args.interval, args.test_blocks, args.budget, args.hack_steps = 40, 30, 10, 8, 4, 20
        args.out += "-quick"
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    t0, load_before = time.perf_counter(), os.getloadavg()
    tables = set(args.tables.split(","))
    if tables - {"ddk", "pgkd", "hacking"} or ("hacking" in tables and "ddk" not in tables):
        raise SystemExit("--tables: a subset of ddk,pgkd,hacking (hacking needs ddk's teacher)")
    texts, notes, results = [], [], {}
    tokenizer = None
    if "ddk" in tables:
        print("Table 1: DDK vs uniform vs size-proportional mixtures", flush=True)
        t1, r1, teacher_dir, tokenizer = table_ddk(args, out, cache)
        texts.append(t1)
        notes.append(r1["note"])
        results["ddk"] = r1
    if "pgkd" in tables:
        if tokenizer is None:  # the scripted teacher's server only encodes its answers with it
            from lmdistill.data.corpora import read_fortunes
            from lmdistill.data.tokenizer import train_bpe_tokenizer

            tokenizer = train_bpe_tokenizer([d.text for d in read_fortunes()], vocab_size=2048)
        print("Table 2: PGKD vs random vs robust selection", flush=True)
        t2, r2 = table_pgkd(args, out, tokenizer)
        texts.append(t2)
        notes.append(r2["note"])
        results["pgkd"] = r2
    if "hacking" in tables:
        print("Table 3: teacher hacking", flush=True)
        t3, r3 = table_hacking(args, out, cache, teacher_dir, tokenizer)
        texts.append(t3)
        notes.append(r3["note"])
        results["hacking"] = r3
    load_after = os.getloadavg()
    closing = (f"Closing note. {' '.join(notes)} Bench total {time.perf_counter() - t0:.0f}s, "
               f"torch threads {args.threads}; load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_before)} at "
               f"start, {'/'.join(f'{x:.2f}' for x in load_after)} at end (shared cores: wall times are indicative).")
    report = "\n\n".join([*texts, closing])
    print("\n" + report)
    (out / "tables.md").write_text(report + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({**results, "args": vars(args)}, indent=1, default=str),
                                      encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
