"""One `embed-distill` run end to end: task -> teacher signal -> training -> saved model -> evaluation.

A run directory holds the trained model (``model/``), ``run.json`` (method, resolved config, metrics,
sizes, timings) and ``losses.json``. `evaluate_run_dir` reloads a run for `embed-eval`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmdistill.embed.config import EmbedConfig, negatives_source, resolve_model_path
from lmdistill.embed.encoder import TextEncoder
from lmdistill.embed.evaluate import (
    M3_HEADS,
    EvalRow,
    bm25_throughput,
    evaluate_bm25,
    evaluate_encoder,
    evaluate_m3,
    measure_throughput,
)
from lmdistill.embed.flipped import CausalLMEncoder, LoraLMEncoder
from lmdistill.embed.m3 import M3Encoder
from lmdistill.embed.mining import TrainingSignal, build_training_signal
from lmdistill.embed.task import RetrievalTask, load_gcide_task
from lmdistill.embed.train import train_flipped, train_infonce, train_m3, train_margin_mse
from lmdistill.errors import ConfigError

Log = Callable[[str], None]
M3_LABELS = {"dense": "M3 dense", "sparse": "M3 sparse (lexical)", "multi": "M3 multi-vector", "combined": "M3 combined"}


def seed_everything(seed: int, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


def task_from_config(cfg: EmbedConfig) -> RetrievalTask:
    t = cfg.task
    return load_gcide_task(
        name=t.name,
        train_size=t.train_size,
        eval_queries=t.eval_queries,
        eval_corpus=t.eval_corpus,
        max_definitions=t.max_definitions,
        max_chars=t.max_chars,
        cache_dir=t.cache_dir,
    )


def load_encoder(section, *, normalize: bool | None = None) -> TextEncoder:
    return TextEncoder.from_pretrained(
        resolve_model_path(section.path),
        num_layers=section.num_layers,
        pooling=section.pooling,
        normalize=(section.similarity == "cosine") if normalize is None else normalize,
        max_seq_length=section.max_seq_length,
    )


def _encode_fn(model, batch_size: int):
    return lambda texts: model.encode(list(texts), batch_size=batch_size)


def _throughput_texts(task: RetrievalTask, n: int) -> list[str]:
    return list(task.corpus.values())[:n]


def baseline_rows(task: RetrievalTask, cfg: EmbedConfig, log: Log | None = None) -> list[EvalRow]:
    """BM25 and the teacher encoder zero-shot (all-MiniLM-L6-v2 by default)."""
    rows = [
        EvalRow(
            "BM25 (bm25s)", evaluate_bm25(task), texts_per_s=bm25_throughput(task, cfg.eval.throughput_texts), params=0
        )
    ]
    teacher = load_encoder(cfg.teacher)
    encode = _encode_fn(teacher, cfg.eval.batch_size)
    label = "MiniLM-L6 zero-shot (teacher)" if cfg.teacher.path == "minilm" else f"{cfg.teacher.path} zero-shot (teacher)"
    rows.append(
        EvalRow(
            label,
            evaluate_encoder(encode, task, similarity=cfg.teacher.similarity),
            texts_per_s=measure_throughput(encode, _throughput_texts(task, cfg.eval.throughput_texts)),
            params=teacher.num_parameters(),
        )
    )
    if log:
        log(f"baselines done: {', '.join(r.name for r in rows)}")
    return rows


def training_signal(cfg: EmbedConfig, task: RetrievalTask, teacher: TextEncoder | None) -> TrainingSignal:
    encode = None if teacher is None else _encode_fn(teacher, cfg.eval.batch_size)
    return build_training_signal(
        task,
        teacher_encode=encode,
        teacher_similarity=cfg.teacher.similarity,
        negatives_from=negatives_source(cfg),
        top_k=cfg.mining.top_k,
        skip_top=cfg.mining.skip_top,
    )


def run_distill(
    cfg: EmbedConfig,
    *,
    task: RetrievalTask | None = None,
    signal: TrainingSignal | None = None,
    log: Log | None = print,
) -> list[EvalRow]:
    """Train ``cfg.method``, save it under ``cfg.output_dir`` and return its evaluation row(s).

    ``task`` and ``signal`` may be passed in to share them between runs (the benchmark does); a passed
    signal must have been built with this config's teacher and negative source.
    """
    seed_everything(cfg.seed, cfg.threads)
    task = task if task is not None else task_from_config(cfg)
    if log:
        log(f"task {task.summary()}")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    neg_source = negatives_source(cfg)
    needs_teacher = cfg.method in ("margin_mse", "flipped_kd") or neg_source == "teacher"
    if signal is None and (needs_teacher or neg_source != "none"):
        teacher = load_encoder(cfg.teacher) if needs_teacher else None
        signal = training_signal(cfg, task, teacher)
        del teacher
    bs = cfg.eval.batch_size
    texts = _throughput_texts(task, cfg.eval.throughput_texts)

    if cfg.method in ("infonce", "margin_mse"):
        student = load_encoder(cfg.student)
        if cfg.method == "infonce":
            result = train_infonce(
                student, task, cfg.train, signal=signal, random_fraction=cfg.mining.random_fraction, seed=cfg.seed, log=log
            )
            name = "InfoNCE student"
        else:
            assert signal is not None
            result = train_margin_mse(
                student, task, cfg.train, signal=signal, random_fraction=cfg.mining.random_fraction, seed=cfg.seed, log=log
            )
            name = "Margin-MSE student"
        student.save(out_dir / "model")
        encode = _encode_fn(student, bs)
        rows = [
            EvalRow(
                name,
                evaluate_encoder(encode, task, similarity=cfg.student.similarity),
                texts_per_s=measure_throughput(encode, texts),
                params=student.num_parameters(),
                trainable_params=student.num_parameters(),
                train_seconds=result.seconds,
            )
        ]
    elif cfg.method == "flipped_kd":
        assert signal is not None and cfg.lm.path is not None
        lm = LoraLMEncoder(
            cfg.lm.path,
            r=cfg.lm.lora_r,
            alpha=cfg.lm.lora_alpha,
            dropout=cfg.lm.lora_dropout,
            target_modules=cfg.lm.target_modules,
            representation_module=cfg.lm.representation_module,
            pooling=cfg.lm.pooling,
            max_seq_length=cfg.lm.max_seq_length,
        )
        result = train_flipped(
            lm,
            task,
            cfg.train,
            signal=signal,
            margin=cfg.mcl.margin,
            pos_threshold=cfg.mcl.pos_threshold,
            neg_threshold=cfg.mcl.neg_threshold,
            mcl_weight=cfg.mcl.mcl_weight,
            dist_weight=cfg.mcl.dist_weight,
            random_fraction=cfg.mining.random_fraction,
            seed=cfg.seed,
            log=log,
        )
        lm.save(out_dir / "model")
        encode = _encode_fn(lm, bs)
        rows = [
            EvalRow(
                "Flipped-KD LM (LoRA encoder, MCL)",
                evaluate_encoder(encode, task),
                texts_per_s=measure_throughput(encode, texts),
                params=lm.num_parameters(),
                trainable_params=sum(p.numel() for _, p in lm.trainable_parameters()),
                train_seconds=result.seconds,
                extra={"representation_module": lm.representation_name, "dim": cfg.lm.lora_r},
            )
        ]
    elif cfg.method == "m3":
        model = M3Encoder(load_encoder(cfg.student), colbert_dim=cfg.m3.colbert_dim)
        result = train_m3(
            model,
            task,
            cfg.train,
            signal=signal,
            score_weights=cfg.m3.score_weights,
            loss_weights=cfg.m3.loss_weights,
            self_distill=cfg.m3.self_distill,
            random_fraction=cfg.mining.random_fraction,
            seed=cfg.seed,
            log=log,
        )
        model.save(out_dir / "model")
        rows = m3_rows(model, task, cfg, train_seconds=result.seconds, texts=texts)
    else:  # pragma: no cover - the config validator rejects other methods
        raise ConfigError(f"unknown method '{cfg.method}'")

    (out_dir / "losses.json").write_text(json.dumps({"loss": result.losses, **result.extra}))
    (out_dir / "run.json").write_text(
        json.dumps(
            {
                "method": cfg.method,
                "config": cfg.model_dump(mode="json"),
                "task": task.summary(),
                "rows": [r.to_json() for r in rows],
            },
            indent=2,
        )
    )
    if log:
        for r in rows:
            log(f"{r.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items()))
    return rows


def m3_rows(model: M3Encoder, task: RetrievalTask, cfg: EmbedConfig, *, train_seconds: float | None, texts: list[str]) -> list[EvalRow]:
    per_head = evaluate_m3(model, task, batch_size=cfg.eval.batch_size, score_weights=cfg.m3.score_weights)
    tps = measure_throughput(lambda t: model.encode_all(list(t), batch_size=cfg.eval.batch_size), texts)
    size = model.num_parameters()
    suffix = "" if cfg.m3.self_distill else " (no self-KD)"
    return [
        EvalRow(
            M3_LABELS[h] + suffix,
            per_head[h],
            texts_per_s=tps,
            params=size,
            trainable_params=size,
            train_seconds=train_seconds if h == "combined" else None,
        )
        for h in M3_HEADS
    ]


def lm_zero_shot_row(path: str, task: RetrievalTask, cfg: EmbedConfig) -> EvalRow:
    """The decoder LM before flipped KD: mean-pooled last hidden states."""
    lm = CausalLMEncoder(path, pooling=cfg.lm.pooling, max_seq_length=cfg.lm.max_seq_length)
    encode = _encode_fn(lm, cfg.eval.batch_size)
    return EvalRow(
        "LM zero-shot (mean-pooled hidden states)",
        evaluate_encoder(encode, task),
        texts_per_s=measure_throughput(encode, _throughput_texts(task, cfg.eval.throughput_texts)),
        params=lm.num_parameters(),
    )


def read_run(run_dir: str | Path) -> dict:
    run_file = Path(run_dir) / "run.json"
    if not run_file.is_file():
        raise ConfigError(f"'{run_dir}' is not an embed-distill run directory (no run.json)")
    return json.loads(run_file.read_text())


def evaluate_run_dir(run_dir: str | Path, task: RetrievalTask, cfg: EmbedConfig) -> list[EvalRow]:
    """Reload a saved run's model and evaluate it on ``task`` (training time is taken from run.json)."""
    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    method = meta["method"]
    saved = {r["name"]: r for r in meta["rows"]}
    model_dir = run_dir / "model"
    texts = _throughput_texts(task, cfg.eval.throughput_texts)
    bs = cfg.eval.batch_size
    if method == "m3":
        model = M3Encoder.load(model_dir)
        rows = m3_rows(model, task, cfg, train_seconds=None, texts=texts)
        for r in rows:
            r.train_seconds = saved.get(r.name, {}).get("train_seconds")
        return rows
    if method == "flipped_kd":
        model = LoraLMEncoder.load(model_dir)
        trainable = sum(p.numel() for _, p in model.trainable_parameters())
    else:
        model = TextEncoder.from_pretrained(model_dir)
        trainable = model.num_parameters()
    name, old = next(iter(saved.items()))
    encode = _encode_fn(model, bs)
    return [
        EvalRow(
            name,
            evaluate_encoder(encode, task),
            texts_per_s=measure_throughput(encode, texts),
            params=model.num_parameters(),
            trainable_params=trainable,
            train_seconds=old.get("train_seconds"),
        )
    ]
