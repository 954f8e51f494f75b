"""One `embed-distill` run end to end: task -> teacher signal -> training -> saved model -> evaluation.

A run directory holds the trained model (``model/``), ``run.json`` (method, resolved config, metrics,
sizes, timings) and ``losses.json``. `evaluate_run_dir` reloads a run for `embed-eval`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

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
log = logging.getLogger(__name__)
M3_LABELS = {"dense": "M3 dense", "sparse": "M3 sparse (lexical)", "multi": "M3 multi-vector", "combined": "M3 combined"}


def seed_everything(seed: int, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


def task_from_config(cfg: EmbedConfig) -> RetrievalTask:
    return load_gcide_task(**cfg.task.model_dump())


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


def encoder_row(
    name: str,
    model,
    task: RetrievalTask,
    cfg: EmbedConfig,
    *,
    similarity: str = "cosine",
    trainable_params: int | None = None,
    train_seconds: float | None = None,
    extra: dict[str, object] | None = None,
) -> EvalRow:
    """Retrieval metrics, encode throughput and size of one encoder (anything with ``encode``)."""
    encode = _encode_fn(model, cfg.eval.batch_size)
    return EvalRow(
        name,
        evaluate_encoder(encode, task, similarity=similarity),
        texts_per_s=measure_throughput(encode, _throughput_texts(task, cfg.eval.throughput_texts)),
        params=model.num_parameters(),
        trainable_params=trainable_params,
        train_seconds=train_seconds,
        extra=extra or {},
    )


def baseline_rows(task: RetrievalTask, cfg: EmbedConfig, log: Log | None = None) -> list[EvalRow]:
    """BM25 and the teacher encoder zero-shot (all-MiniLM-L6-v2 by default)."""
    bm25 = EvalRow("BM25 (bm25s)", evaluate_bm25(task), texts_per_s=bm25_throughput(task, cfg.eval.throughput_texts), params=0)
    label = "MiniLM-L6 zero-shot (teacher)" if cfg.teacher.path == "minilm" else f"{cfg.teacher.path} zero-shot (teacher)"
    rows = [bm25, encoder_row(label, load_encoder(cfg.teacher), task, cfg, similarity=cfg.teacher.similarity)]
    if log:
        log(f"baselines done: {', '.join(r.name for r in rows)}")
    return rows


def needs_teacher(cfg: EmbedConfig) -> bool:
    return cfg.method in ("margin_mse", "flipped_kd") or negatives_source(cfg) == "teacher"


def _signal_cache_file(cfg: EmbedConfig, task: RetrievalTask) -> Path:
    """Where the signal for this task, teacher and mining setup is kept: the teacher runs once, not per run."""
    from lmdistill.embed.task import default_cache_dir

    texts = hashlib.sha1()
    for pair in task.train:
        texts.update(pair.query.encode() + b"\0" + pair.positive_id.encode() + b"\0")
    for doc_id, text in task.train_corpus.items():
        texts.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    settings = {
        "texts": texts.hexdigest(),
        "teacher": cfg.teacher.model_dump(mode="json") if needs_teacher(cfg) else None,
        "negatives": negatives_source(cfg),
        "top_k": cfg.mining.top_k,
        "skip_top": cfg.mining.skip_top,
        "version": 2,
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.task.cache_dir) if cfg.task.cache_dir is not None else default_cache_dir()
    return cache / f"signal-{key}.safetensors"


_SIGNAL_FORMAT = "lmdistill-training-signal-1"


def save_signal(signal: TrainingSignal, path: Path) -> None:
    """A training signal as safetensors: index lists as int64 tensors (the ragged negatives flattened with
    their lengths), teacher embeddings as they are, document ids and groups as JSON metadata. The file's
    name is predictable from public settings, so it must never be a format that runs code when read."""
    tensors = {
        "positive_index": torch.tensor(signal.positive_index, dtype=torch.int64),
        "negatives_flat": torch.tensor([j for row in signal.negatives for j in row], dtype=torch.int64),
        "negatives_lengths": torch.tensor([len(row) for row in signal.negatives], dtype=torch.int64),
    }
    for name in ("teacher_query", "teacher_docs"):
        value = getattr(signal, name)
        if value is not None:
            tensors[name] = value.detach().cpu().contiguous()
    meta = {"format": _SIGNAL_FORMAT, "doc_ids": json.dumps(signal.doc_ids), "doc_groups": json.dumps(signal.doc_groups)}
    save_file(tensors, str(path), metadata=meta)


def load_signal(path: Path) -> TrainingSignal:
    """Read :func:`save_signal`'s file; ``ValueError`` names the file when it is not one."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _SIGNAL_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_SIGNAL_FORMAT!r}")
        tensors = load_file(str(path))
        flat, lengths = tensors["negatives_flat"].tolist(), tensors["negatives_lengths"].tolist()
        starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        return TrainingSignal(
            doc_ids=json.loads(meta["doc_ids"]),
            positive_index=tensors["positive_index"].tolist(),
            negatives=[flat[a:b] for a, b in zip(starts[:-1], starts[1:])],
            doc_groups=json.loads(meta["doc_groups"]),
            teacher_query=tensors.get("teacher_query"),
            teacher_docs=tensors.get("teacher_docs"),
        )
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a training-signal cache ({exc})") from exc


def training_signal(cfg: EmbedConfig, task: RetrievalTask, *, use_cache: bool = True) -> TrainingSignal:
    """Cached teacher embeddings and mined negatives for ``cfg`` (computed, and cached, on first use).
    A cache file that cannot be read as one (damaged, or planted) is rebuilt with a warning."""
    cache_file = _signal_cache_file(cfg, task)
    if use_cache and cache_file.is_file():
        try:
            return load_signal(cache_file)
        except ValueError as exc:
            log.warning("%s; rebuilding it", exc)
    teacher = load_encoder(cfg.teacher) if needs_teacher(cfg) else None
    signal = build_training_signal(
        task,
        teacher_encode=None if teacher is None else _encode_fn(teacher, cfg.eval.batch_size),
        teacher_similarity=cfg.teacher.similarity,
        negatives_from=negatives_source(cfg),
        top_k=cfg.mining.top_k,
        skip_top=cfg.mining.skip_top,
    )
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_signal(signal, tmp)
        tmp.replace(cache_file)
    return signal


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
    if signal is None and (needs_teacher(cfg) or negatives_source(cfg) != "none"):
        signal = training_signal(cfg, task)
    common = dict(random_fraction=cfg.mining.random_fraction, seed=cfg.seed, log=log)

    if cfg.method in ("infonce", "margin_mse"):
        student = load_encoder(cfg.student)
        if cfg.method == "infonce":
            result = train_infonce(student, task, cfg.train, signal=signal, **common)
            name = "InfoNCE student"
        else:
            assert signal is not None
            result = train_margin_mse(
                student, task, cfg.train, signal=signal, inbatch_weight=cfg.margin_mse.inbatch_weight, **common
            )
            name = "Margin-MSE student" + (" (+ in-batch InfoNCE)" if cfg.margin_mse.inbatch_weight > 0 else "")
        student.save(out_dir / "model")
        size = student.num_parameters()
        rows = [encoder_row(name, student, task, cfg, similarity=cfg.student.similarity, trainable_params=size, train_seconds=result.seconds)]
    elif cfg.method == "flipped_kd":
        assert signal is not None
        lm = lora_encoder(cfg, task)
        m = cfg.mcl
        result = train_flipped(
            lm,
            task,
            cfg.train,
            signal=signal,
            margin=m.margin,
            pos_threshold=m.pos_threshold,
            neg_threshold=m.neg_threshold,
            mcl_weight=m.mcl_weight,
            dist_weight=m.dist_weight,
            contrastive_weight=m.contrastive_weight,
            **common,
        )
        lm.save(out_dir / "model")
        rows = [
            encoder_row(
                "Flipped-KD LM (LoRA encoder, MCL" + (" + InfoNCE)" if m.contrastive_weight > 0 else ")"),
                lm,
                task,
                cfg,
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
            **common,
        )
        model.save(out_dir / "model")
        rows = m3_rows(model, task, cfg, train_seconds=result.seconds)
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


def m3_rows(model: M3Encoder, task: RetrievalTask, cfg: EmbedConfig, *, train_seconds: float | None) -> list[EvalRow]:
    per_head = evaluate_m3(model, task, batch_size=cfg.eval.batch_size, score_weights=cfg.m3.score_weights)
    texts = _throughput_texts(task, cfg.eval.throughput_texts)
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


def lora_encoder(cfg: EmbedConfig, task: RetrievalTask | None = None) -> LoraLMEncoder:
    """The flipped-KD student as configured (call after `seed_everything`: LoRA's A is random).

    With ``lm.center`` the hidden-state mean is estimated on the task's training texts (queries and
    training corpus, never the evaluation split), so ``task`` is needed then.
    """
    assert cfg.lm.path is not None
    lm = cfg.lm
    encoder = LoraLMEncoder(
        lm.path,
        r=lm.lora_r,
        alpha=lm.lora_alpha,
        dropout=lm.lora_dropout,
        target_modules=lm.target_modules,
        representation_module=lm.representation_module,
        pooling=lm.pooling,
        max_seq_length=lm.max_seq_length,
    )
    if lm.center:
        if task is None:
            raise ValueError("lm.center needs the task: the mean is taken over its training texts")
        encoder.fit_center([p.query for p in task.train] + list(task.train_corpus.values()), batch_size=cfg.eval.batch_size)
    return encoder


def lora_init_row(task: RetrievalTask, cfg: EmbedConfig) -> EvalRow:
    """The flipped-KD student before training: the same seed gives the same random A as `run_distill`."""
    seed_everything(cfg.seed, cfg.threads)
    lm = lora_encoder(cfg, task)
    return encoder_row(f"LM LoRA-A code before training ({lm.representation_name.split('model.')[-1]})", lm, task, cfg)


def lm_zero_shot_row(path: str, task: RetrievalTask, cfg: EmbedConfig) -> EvalRow:
    """The decoder LM before flipped KD: pooled last hidden states (``cfg.lm.pooling``)."""
    lm = CausalLMEncoder(path, pooling=cfg.lm.pooling, max_seq_length=cfg.lm.max_seq_length)
    return encoder_row(f"LM zero-shot ({cfg.lm.pooling}-pooled hidden states)", lm, task, cfg)


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
    if method == "m3":
        rows = m3_rows(M3Encoder.load(model_dir), task, cfg, train_seconds=None)
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
    return [encoder_row(name, model, task, cfg, trainable_params=trainable, train_seconds=old.get("train_seconds"))]
