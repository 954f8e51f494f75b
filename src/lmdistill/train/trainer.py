"""The one training loop. Pretraining, label-only training and every distillation objective run here;
methods plug in as an objective (``lmdistill.losses``) and a teacher source (``lmdistill.teachers``).

Devices and processes go through Hugging Face Accelerate (DDP under ``torchrun`` / ``accelerate
launch``; FSDP/DeepSpeed settings pass through its config). Gradient accumulation is done here with
``no_sync`` so that the loss normalisation is exact: every micro-batch's summed per-token loss is
divided by the number of valid target tokens in the whole global batch (all micro-batches, all
ranks), so 4 accumulated micro-batches give the same gradient as one batch 4x the size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import RunConfig, dump_config
from lmdistill.constants import IGNORE_INDEX
from lmdistill.data.blocks import BlockDataset, TokenStream, collate
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.eval.lm import evaluate_lm
from lmdistill.losses import Objective, OuterStep, fused_linear_distill, reduce_tokens
from lmdistill.models.heads import linear_head_mismatch
from lmdistill.teachers.base import TeacherSource
from lmdistill.train.checkpoint import CheckpointManager
from lmdistill.train.schedule import accumulation_steps
from lmdistill.train.sources import BatchSource, BlockSource


logger = logging.getLogger(__name__)


class TrainingDiverged(LmdistillError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


@dataclass
class TrainResult:
    output_dir: Path
    final_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0


class MetricsLog:
    """JSON lines plus TensorBoard events, written by the main process only."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Objective,
        train_stream: TokenStream,
        validation_stream: TokenStream,
        teacher: TeacherSource | None = None,
        train_source: BatchSource | None = None,
        vocab_size: int | None = None,
        accelerator: Accelerator | None = None,
        show_progress: bool = True,
        evaluator: Callable[["Trainer"], dict[str, float]] | None = None,
    ) -> None:
        self.config = config
        self.tc = config.train
        self.accelerator = accelerator or Accelerator(mixed_precision=self.tc.mixed_precision, cpu=not torch.cuda.is_available())
        self.tokenizer = tokenizer
        self.objective = objective
        if objective.requires_teacher and teacher is None:
            raise LmdistillError(f"objective '{objective.name}' needs a teacher; add a 'teacher:' section to the config")
        if objective.requires_teacher:
            teacher.check_objective(objective)
        self.teacher = teacher
        self.vocab_size = vocab_size or len(tokenizer)
        self.train_data = BlockDataset(train_stream, config.data.block_size)
        self.source: BatchSource = train_source or BlockSource(self.train_data, self.tc.batch_size, self.tc.seed)
        self.val_data = BlockDataset(validation_stream, config.data.block_size)
        self.val_bytes_per_token = validation_stream.bytes_per_target
        self.output_dir = Path(config.output_dir)
        self.show_progress = show_progress
        # Runs whose validation data are not packed blocks (padded prompt/response tasks) bring their own
        # evaluation; it receives the trainer and returns metrics named like evaluate_lm's.
        self.evaluator = evaluator
        # chunked loss: True/False from the config, or decided on the first batch ("auto")
        self.use_chunked: bool | None = None if self.tc.chunked_loss == "auto" else bool(self.tc.chunked_loss)
        if self.use_chunked and self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(
                f"train.chunked_loss: true reads the output layer outside the forward, which "
                f"{self.accelerator.distributed_type.value} shards; use chunked_loss: auto or false"
            )

        acc = self.accelerator
        self.micro_batch, self.accum = accumulation_steps(self.tc.batch_size, self.tc.micro_batch_size, acc.num_processes)

        decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim < 2]
        extra = objective.parameters()
        for p in extra:  # learned objective parameters (e.g. a fusion network) live beside the student
            p.data = p.data.to(self.accelerator.device)
        groups = [{"params": decay, "weight_decay": self.tc.weight_decay}, {"params": no_decay + extra, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.tc.lr, betas=self.tc.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.tc.warmup_steps, self.tc.steps, self.tc.min_lr_ratio)
        )
        self.model, self.optimizer = acc.prepare(student, optimizer)
        self.scheduler = scheduler
        self.checkpoints = CheckpointManager(self.output_dir, keep=config.checkpoint.keep)
        self.log = MetricsLog(self.output_dir, acc.is_main_process)
        self.step = 0
        self.source.bind(self)

    # ----------------------------------------------------------------------------------------- loss
    def _micro_loss(self, batch: dict[str, torch.Tensor], normalizer: torch.Tensor) -> torch.Tensor:
        """Summed per-token loss of one micro-batch divided by the global batch's valid-token count."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        flat_labels = labels.reshape(-1)
        # Padded (unpacked) batches carry an attention mask; packed blocks need none.
        extra = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        if self.use_chunked is None:
            self.use_chunked = self._choose_chunked(input_ids, extra)
        if self.use_chunked:
            out = self.model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, **extra)
            hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])
            head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
            bias = None if getattr(head, "bias", None) is None else head.bias[: self.vocab_size]
            teacher_signal = None
            if self.objective.requires_teacher:
                teacher_signal = self.teacher.chunked_signal(batch)
            return fused_linear_distill(
                hidden, head.weight[: self.vocab_size], teacher_signal, flat_labels, self.objective,
                chunk_size=self.tc.chunk_size, normalizer=normalizer, student_bias=bias,
            )
        logits = self.model(input_ids=input_ids, **extra).logits[..., : self.vocab_size]
        teacher_signal = None
        if self.objective.requires_teacher:
            teacher_signal = self.teacher.signal(batch)
        per_token = self.objective.per_token(logits.reshape(-1, logits.shape[-1]), teacher_signal, flat_labels)
        return reduce_tokens(per_token, flat_labels, normalizer=normalizer)

    @torch.no_grad()
    def _choose_chunked(self, input_ids: torch.Tensor, extra: dict[str, torch.Tensor]) -> bool:
        """``chunked_loss: auto``: use the chunked path when it computes what the plain path does.

        It never materialises the [tokens, vocab] logits and is faster on CPU as well, but it assumes
        logits = final hidden state @ output weight (+ bias), read outside the forward. So the plain path is
        kept for: models that post-process logits (soft-capping, scaling: refused by config field and by a
        one-off bit-exact comparison of the model's logits with hidden @ W on this batch's first row, for the
        student here and for the teacher by its ``chunked_mismatch``),
        sharded parameters (FSDP, DeepSpeed), and objectives coupling all rows of a batch (SinKD without a
        group size). All ranks take the same decision. Under autocast the chunked path computes the
        teacher's logits in float32 where the plain path has them in bf16/fp16: rounding differences only.
        """
        acc = self.accelerator
        why = None
        needs_teacher = self.objective.requires_teacher
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            why = f"{acc.distributed_type.value} shards the output layer"
        elif self.objective.batch_coupled and self.objective.row_group_size is None:
            why = f"objective '{self.objective.name}' couples all rows of the batch"
        else:
            # one row, its real tokens only (left/right padding would give meaningless or NaN positions)
            mask = extra.get("attention_mask")
            keep = slice(None) if mask is None else mask[0].bool()
            probe_ids = input_ids[:1, keep]
            student = acc.unwrap_model(self.model)
            why = linear_head_mismatch(
                student, probe_ids,
                lambda m: m(input_ids=probe_ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1],
            )
            if why is not None:
                why = f"the student: {why}"
            elif needs_teacher:
                why = self.teacher.chunked_mismatch(probe_ids)
                why = None if why is None else f"{self.teacher.description}: {why}"
        chosen = why is None
        if acc.num_processes > 1:  # every rank probed its own batch; chunk only if all agree
            votes = acc.reduce(torch.tensor(float(chosen), device=acc.device), reduction="sum")
            chosen = int(votes.item()) == acc.num_processes
            why = why or "another rank's probe kept the plain path"
        if not chosen:
            logger.info("loss on the plain path (full logits): %s", why)
            return False
        logger.info("loss on the chunked path: logits built %d rows at a time, never for the whole batch",
                    self.tc.chunk_size or 256)
        return True

    def train_step(self, step: int) -> float:
        acc = self.accelerator
        batches = self.source.micro_batches(step, acc.process_index, acc.num_processes, self.micro_batch)
        local_valid = torch.tensor(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches), dtype=torch.float64)
        global_valid = acc.reduce(local_valid.to(acc.device), reduction="sum").to(torch.float32).clamp_min(1.0)
        total = torch.zeros((), dtype=torch.float64)
        self.model.train()
        for j, batch in enumerate(batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            last = j == len(batches) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss = self._micro_loss(batch, global_valid)
                # DDP averages gradients over ranks; scaling by the world size turns that into a sum,
                # so the gradient is that of (sum of all tokens' losses) / (global valid tokens).
                acc.backward(loss * acc.num_processes)
            total += loss.detach().double().cpu()
        global_loss = acc.reduce(total.to(acc.device), reduction="sum").item()
        if not math.isfinite(global_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss became {global_loss} at step {step + 1}; stopped. The last good checkpoint is kept in "
                f"{self.checkpoints.root} (lower train.lr, enable train.grad_clip, or check the data)."
            )
        self.objective.outer_step(self._outer_step(batches[0], step))
        if self.tc.grad_clip is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.on_step_end(global_loss, step + 1, self.tc.steps)
        return global_loss

    def _outer_step(self, batch: dict[str, torch.Tensor], step: int) -> OuterStep:
        """What an objective's own outer step may use (see :class:`lmdistill.losses.OuterStep`)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        batch = {k: v.to(acc.device) for k, v in batch.items()}

        def student_hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
            extra = {} if attention_mask is None else {"attention_mask": attention_mask}
            was_training = model.training
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # no dropout randomness consumed (exact resume)
                model.eval()
                try:
                    out = model(input_ids=input_ids.to(acc.device), output_hidden_states=True, logits_to_keep=1, **extra)
                finally:
                    model.train(was_training)
            return out.hidden_states[-1]

        def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
            return acc.reduce(t, reduction="mean") if acc.num_processes > 1 else t

        return OuterStep(
            step=step, lr=self.scheduler.get_last_lr()[0], batch=batch, student_hidden=student_hidden,
            output_layer=(head.weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size]),
            teacher_signal=lambda b: self.teacher.signal(b),
            held_out=lambda b: self._held_out_batch(b, step), backward=acc.backward, mean_over_ranks=mean_over_ranks,
        )

    def _held_out_batch(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor] | None:
        """As many training blocks as ``batch`` has rows, none of them in ``batch``, drawn by a generator seeded
        with (seed, step, rank): reproducible on resume (in task runs, whose batches are padded examples, these
        are packed task text). ``None`` when no other block exists."""
        acc = self.accelerator
        generator = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + step * 7919 + acc.process_index)
        if len(self.train_data) < 2:
            return None
        own = set(batch["block_index"].tolist()) if "block_index" in batch else set()
        candidates = torch.randperm(len(self.train_data), generator=generator).tolist()
        picks = [i for i in candidates if i not in own][: batch["input_ids"].shape[0]]
        if not picks:
            return None
        return {k: v.to(acc.device) for k, v in collate([self.train_data[int(i)] for i in picks]).items()}

    # ------------------------------------------------------------------------------- eval, saving
    def evaluate(self) -> dict[str, float]:
        if self.evaluator is not None:
            return self.evaluator(self)
        acc = self.accelerator
        return evaluate_lm(
            acc.unwrap_model(self.model),
            self.val_data,
            bytes_per_token=self.val_bytes_per_token,
            batch_size=self.config.eval.batch_size,
            max_batches=self.config.eval.max_batches,
            teacher=self.teacher if self.teacher is not None and self.teacher.scores_text else None,
            vocab_size=self.vocab_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            all_reduce=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
        )

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.checkpoints.save(
                self.step,
                model=acc.unwrap_model(self.model),
                tokenizer=self.tokenizer,
                optimizer=self.optimizer,
                state={
                    "scheduler": self.scheduler.state_dict(),
                    "objective": self.objective.state_dict(),
                    "data_position": {"next_step": self.step, "seed": self.tc.seed, "source": self.source.state_dict()},
                },
            )
        acc.wait_for_everyone()

    def resume(self) -> bool:
        """Restore the newest complete checkpoint; False when there is none."""
        ckpt = self.checkpoints.latest()
        if ckpt is None:
            return False
        model = self.accelerator.unwrap_model(self.model)
        weights = load_file(str(ckpt.path / "model" / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # Tied output weights are stored once; anything else missing means the wrong checkpoint.
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        real_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if real_missing or unexpected:
            raise LmdistillError(f"checkpoint {ckpt.path} does not fit this model: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        state = CheckpointManager.load_state(ckpt, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.step = int(state["data_position"]["next_step"])
        self.source.load_state_dict(state["data_position"].get("source", {}))
        if self.accelerator.is_main_process:
            print(f"resumed from {ckpt.path} at step {self.step}")
        return True

    def save_final(self, path: Path | None = None) -> Path:
        path = path or self.output_dir / "final"
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = path.with_name(path.name + ".tmp")
            model = acc.unwrap_model(self.model)
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if path.exists():
                import shutil

                shutil.rmtree(path)
            tmp.rename(path)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------- loop
    def train(self, resume: bool = False) -> TrainResult:
        acc = self.accelerator
        if resume:
            self.resume()
        elif acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
        tokens_per_step = self.tc.batch_size * self.config.data.block_size
        history: list[dict[str, Any]] = []
        start_time = time.perf_counter()
        start_step = self.step
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            disable=not (self.show_progress and acc.is_main_process),
        )
        with progress:
            task = progress.add_task("train", total=self.tc.steps, completed=self.step, info="")
            while self.step < self.tc.steps:
                loss = self.train_step(self.step)
                self.step += 1
                elapsed = time.perf_counter() - start_time
                tps = (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                progress.update(task, completed=self.step, info=f"loss {loss:.4f}  {tps:,.0f} tok/s")
                if self.step % self.tc.log_every == 0 or self.step == self.tc.steps:
                    record = {"kind": "train", "step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "tokens_per_second": tps, **self._objective_fields()}
                    history.append(record)
                    self.log.write(record)
                    if acc.is_main_process and self.show_progress and not progress.console.is_terminal:
                        # Logs and CI have no live bar: a plain line per logging step instead.
                        eta = (self.tc.steps - self.step) * elapsed / max(1, self.step - start_step)
                        print(f"step {self.step}/{self.tc.steps}  loss {loss:.4f}  {tps:,.0f} tok/s  eta {eta:.0f}s", flush=True)
                if self.step % self.config.eval.every == 0 and self.step != self.tc.steps:
                    metrics = {"kind": "eval", "step": self.step, **self.evaluate()}
                    history.append(metrics)
                    self.log.write(metrics)
                if self.step % self.config.checkpoint.every == 0 or self.step == self.tc.steps:
                    self.save_checkpoint()
        train_seconds = time.perf_counter() - start_time
        final = {"kind": "eval", "step": self.step, **self.evaluate()}
        history.append(final)
        self.log.write(final)
        self.log.close()
        done = self.step - start_step
        return TrainResult(
            output_dir=self.output_dir,
            final_metrics=final,
            history=history,
            tokens_per_second=done * tokens_per_step / max(train_seconds, 1e-9),
            train_seconds=train_seconds,
        )

    def _objective_fields(self) -> dict[str, float]:
        state = self.objective.state_dict()
        return {f"objective/{k}": v for k, v in state.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
