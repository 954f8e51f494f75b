"""The one training loop. Pretraining, label-only training and every distillation objective run here;
methods plug in as an objective (``lmdistill.losses``) and a teacher source (``lmdistill.teachers``).

Divergence guard: every step checks the global loss and the gradients (all ranks, every loss path: plain,
chunked, eager or compiled kernels) before the optimizer step and stops with :class:`TrainingDiverged`
when one is NaN or infinite. A checkpoint counts as good only once the step after it has computed a finite
loss and finite gradients from its weights; a checkpoint whose weights produced the divergence is removed,
older ones are pruned only after that proof, and no checkpoint or final model is written with non-finite
parameters or optimizer state, or with a non-finite validation loss.

Devices and processes go through Hugging Face Accelerate (DDP under ``torchrun`` / ``accelerate
launch``; FSDP/DeepSpeed settings pass through its config). Gradient accumulation is done here with
``no_sync`` so that the loss normalisation is exact: every micro-batch's summed per-token loss is
divided by the number of valid target tokens in the whole global batch (all micro-batches, all
ranks), so 4 accumulated micro-batches give the same gradient as one batch 4x the size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import TrainingRunConfig, dump_config
from lmdistill.constants import IGNORE_INDEX
from lmdistill.data.blocks import BlockDataset, TokenStream
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.eval.lm import evaluate_lm
from lmdistill.losses import Objective, fused_linear_distill, reduce_tokens
from lmdistill.losses.signals import CROSSTOK
from lmdistill.models.heads import LogitTransform, linear_head_mismatch, logit_transform
from lmdistill.models.lora import enable_gradient_checkpointing, is_lora, load_lora_state, save_lora_student
from lmdistill.teachers.base import TeacherSource
from lmdistill.train.checkpoint import (
    CheckpointContents,
    CheckpointError,
    CheckpointManager,
    file_sha256,
    io_failure,
    write_text_atomic,
)
from lmdistill.train.guard import (
    CollectiveTimeout,
    Heartbeat,
    TrainingDiverged,
    collective_timeout_seconds,
    grads_nonfinite,
    lost_rank,
    make_accelerator,
    nonfinite_names,
    optimizer_tensors,
)
from lmdistill.train.optim import adamw, cosine_schedule
from lmdistill.train.outer import outer_step_inputs
from lmdistill.train.rundir import MetricsLog, RunDirectory
from lmdistill.train.schedule import accumulation_steps
from lmdistill.train.sources import BatchSource, BlockSource

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0


class Trainer:
    def __init__(
        self,
        config: TrainingRunConfig,
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
        run_dir: RunDirectory | None = None,
    ) -> None:
        self.config = config
        self.tc = config.train
        self.accelerator = accelerator or make_accelerator(self.tc.mixed_precision)
        self.run_dir = run_dir or RunDirectory(config.output_dir, is_main=self.accelerator.is_main_process)
        self.tokenizer = tokenizer
        self.objective = objective
        if objective.requires_teacher and teacher is None:
            raise LmdistillError(f"objective '{objective.name}' needs a teacher; add a 'teacher:' section to the config")
        if objective.requires_teacher:
            teacher.check_objective(objective)
        self.teacher = teacher
        self.vocab_size = vocab_size or len(tokenizer)
        self.train_data = BlockDataset(train_stream, config.block_size)
        self.source: BatchSource = train_source or BlockSource(self.train_data, self.tc.batch_size, self.tc.seed)
        self.val_data = BlockDataset(validation_stream, config.block_size)
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
        if self.tc.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        # the student's known logit post-processing (soft-capping, scaling), applied per chunk on the chunked path
        self.student_transform = logit_transform(student.config) or LogitTransform()

        extra = objective.parameters()
        for p in extra:  # learned objective parameters (e.g. a fusion network) live beside the student, undecayed
            p.data = p.data.to(self.accelerator.device)
        optimizer = adamw(student.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay, betas=self.tc.betas,
                          no_decay=extra)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(self.tc.warmup_steps, self.tc.steps, self.tc.min_lr_ratio)
        )
        self.model, self.optimizer = acc.prepare(student, optimizer)
        self.scheduler = scheduler
        self.checkpoints = CheckpointManager(self.output_dir, keep=config.checkpoint.keep)
        self.log = MetricsLog(self.output_dir, acc.is_main_process)
        self.step = 0
        self._prune_pending = False  # the newest checkpoint awaits the next step's proof that it is good
        self.heartbeat: Heartbeat | None = None
        self.source.bind(self)
        self.run_dir.acquire()  # locked (and checked writable) for as long as this trainer runs

    # ----------------------------------------------------------------------------------------- loss
    def _micro_loss(self, batch: dict[str, torch.Tensor], normalizer: torch.Tensor) -> torch.Tensor:
        """Summed per-token loss of one micro-batch divided by the global batch's valid-token count."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        flat_labels = labels.reshape(-1)
        # Padded (unpacked) batches carry an attention mask; packed blocks need none.
        extra = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        if self.use_chunked is None:
            self.use_chunked = self._choose_chunked(input_ids, extra)
        objective = self.objective.for_batch(batch)  # per-row batch fields, for the objectives that read them
        # representation objectives read both models' hidden states; objectives without a logit part skip logits
        states, logit_part = self.objective.uses_states, self.objective.reads_logits
        chunked = self.use_chunked or not logit_part
        if chunked:
            out = self.model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, **extra)
        else:
            out = self.model(input_ids=input_ids, output_hidden_states=states, **extra)
        teacher_signal = teacher_states = None
        if self.objective.requires_teacher:
            if states:
                teacher_signal, teacher_states = self.teacher.signal_and_states(batch, chunked=chunked)
            else:
                teacher_signal = self.teacher.chunked_signal(batch) if chunked else self.teacher.signal(batch)
        loss = None
        if logit_part and chunked:
            hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])
            head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
            bias = None if getattr(head, "bias", None) is None else head.bias[: self.vocab_size]
            loss = fused_linear_distill(
                hidden, head.weight[: self.vocab_size], teacher_signal, flat_labels, objective,
                chunk_size=self.tc.chunk_size, normalizer=normalizer, student_bias=bias,
                student_softcap=self.student_transform.softcap, student_scale=self.student_transform.scale,
            )
        elif logit_part:
            logits = out.logits[..., : self.vocab_size]
            per_token = objective.per_token(logits.reshape(-1, logits.shape[-1]), teacher_signal, flat_labels)
            loss = reduce_tokens(per_token, flat_labels, normalizer=normalizer)
        if states:
            per_token = objective.state_per_token(out.hidden_states, teacher_states, flat_labels)
            state_loss = reduce_tokens(per_token, flat_labels, normalizer=normalizer)
            loss = state_loss if loss is None else loss + state_loss
        return loss

    @torch.no_grad()
    def _choose_chunked(self, input_ids: torch.Tensor, extra: dict[str, torch.Tensor]) -> bool:
        """``chunked_loss: auto``: use the chunked path when it computes what the plain path does.

        It never materialises the [tokens, vocab] logits and is faster on CPU as well, but it assumes
        logits = final hidden state @ output weight (+ bias), read outside the forward. So the plain path is
        kept for: models that post-process logits (soft-capping, scaling: refused by config field and by a
        one-off bit-exact comparison of the model's logits with hidden @ W on this batch's first row, for the
        student here and for the teacher by its ``chunked_mismatch``),
        sharded parameters (FSDP, DeepSpeed), objectives coupling all rows of a batch (SinKD without a
        group size) and cross-tokenizer objectives other than projected_kd (they couple each sequence's rows).
        All ranks take the same decision. Under autocast the chunked path computes the
        teacher's logits in float32 where the plain path has them in bf16/fp16: rounding differences only.
        """
        acc = self.accelerator
        why = None
        needs_teacher = self.objective.requires_teacher
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            why = f"{acc.distributed_type.value} shards the output layer"
        elif self.objective.batch_coupled and self.objective.row_group_size is None:
            why = f"objective '{self.objective.name}' couples all rows of the batch"
        elif needs_teacher and CROSSTOK in self.teacher.signal_kinds and not self.objective.takes_aligned_windows:
            why = f"objective '{self.objective.name}' couples each sequence's rows across tokenizers"
        else:
            # one row, its real tokens only (left/right padding would give meaningless or NaN positions)
            mask = extra.get("attention_mask")
            keep = slice(None) if mask is None else mask[0].bool()
            probe_ids = input_ids[:1, keep]
            student = acc.unwrap_model(self.model)
            why = linear_head_mismatch(
                student, probe_ids,
                lambda m: m(input_ids=probe_ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1],
                allow_transform=True,  # a known soft-cap or scale is applied per chunk
            )
            if why is None and self.objective.has_outer_step and not self.student_transform.is_identity:
                why = f"objective '{self.objective.name}' rebuilds logits from the output layer without the transform"
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
        self._average_objective_grads()
        # One collective carries the loss and the count of non-finite gradients (sharded under FSDP, so each
        # rank checks its own). Under fp16 the gradient scaler owns overflowing gradients: it skips the step.
        bad_grads = 0.0 if acc.scaler is not None else float(grads_nonfinite(self.model.parameters()))
        stats = acc.reduce(torch.tensor([float(total), bad_grads], dtype=torch.float64, device=acc.device), reduction="sum")
        global_loss, bad_grads = float(stats[0]), float(stats[1])
        if not math.isfinite(global_loss) or bad_grads:
            what = f"loss became {global_loss}" if not math.isfinite(global_loss) else f"gradients became non-finite (loss {global_loss:.4g})"
            self._diverged(step, f"{what} at step {step + 1}")
        self.objective.outer_step(outer_step_inputs(self, batches[0], step))
        extra = self.objective.parameters()  # learned objective parameters get their gradients in outer_step
        if extra and acc.scaler is None and grads_nonfinite(extra):
            self._diverged(step, f"the objective's own parameters got non-finite gradients at step {step + 1}")
        if self._prune_pending:  # the newest checkpoint's weights just gave a finite loss and gradients
            self._prune_checkpoints()
        if self.tc.grad_clip is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.on_step_end(global_loss, step + 1, self.tc.steps)
        return global_loss

    def _average_objective_grads(self) -> None:
        """Objective parameters trained by the main backward (representation projections) live outside the
        DDP-wrapped student, so DDP does not average their gradients: average them over ranks here, through
        Accelerate, to what one process with the global batch computes (each rank's loss was scaled by the world
        size, so the mean over ranks is the global batch's gradient)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        for p in self.objective.parameters():
            if p.grad is not None:
                p.grad.copy_(acc.reduce(p.grad, reduction="mean"))

    def _diverged(self, step: int, what: str) -> None:
        """Stop: the weights after ``step`` updates gave ``what`` (in step ``step + 1``, or in the evaluation
        after step ``step``). A checkpoint of exactly those weights is not good, so it is removed and ``latest``
        points at the newest earlier one."""
        self.optimizer.zero_grad(set_to_none=True)
        acc = self.accelerator
        removed = ""
        if acc.is_main_process:
            if any(c.step == step for c in self.checkpoints.complete()):
                removed = f"; its checkpoint of step {step} was removed"
            self.checkpoints.discard(step)
        kept = [c for c in self.checkpoints.complete() if c.step < step]
        where = f"the last good checkpoint is {kept[-1].path} (step {kept[-1].step}: --resume continues from it)" if kept else \
            "no good checkpoint was written before it"
        raise TrainingDiverged(
            f"{what}; stopped{removed}; {where}. Lower train.lr (allowed with --resume), "
            "set train.grad_clip, or check the data"
        )

    def _prune_checkpoints(self) -> None:
        if self.accelerator.is_main_process:
            self.checkpoints.prune()
        self._prune_pending = False

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

    def _check_finite_state(self, what: str) -> None:
        """Refuse to write ``what`` from non-finite weights or optimizer state (every rank checks its own)."""
        acc = self.accelerator
        bad = nonfinite_names(acc.unwrap_model(self.model).named_parameters()) + nonfinite_names(optimizer_tensors(self.optimizer))
        count = acc.reduce(torch.tensor(float(len(bad)), device=acc.device), reduction="sum")
        if float(count):
            kept = [c for c in self.checkpoints.complete() if c.step < self.step]
            where = f"the last good checkpoint is {kept[-1].path} (step {kept[-1].step})" if kept else "no good checkpoint exists"
            names = ", ".join(bad[:3]) or "another rank's shard"
            raise TrainingDiverged(f"non-finite values after step {self.step} ({names}); {what} was not written; {where}. "
                                   "Lower train.lr or set train.grad_clip")

    def save_checkpoint(self, prune: bool = True) -> None:
        self._check_finite_state(f"checkpoint step {self.step}")
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
                prune=prune,
            )
        acc.wait_for_everyone()

    def resume(self) -> bool:
        """Restore the newest intact checkpoint (a damaged one is skipped with a warning); False when there is none."""
        contents = self.checkpoints.read_newest_intact()
        if contents is None:
            return False
        self._apply_checkpoint(contents)
        self.log.resume_at(self.step, redo_final_eval=self.step >= self.tc.steps)
        if self.accelerator.is_main_process:
            changed = f" with changed settings: {'; '.join(self.run_dir.resume_changes)}" if self.run_dir.resume_changes else ""
            print(f"resumed from {contents.checkpoint.path} at step {self.step}{changed}", flush=True)
        return True

    def _apply_checkpoint(self, contents: CheckpointContents) -> None:
        ckpt = contents.checkpoint
        model = self.accelerator.unwrap_model(self.model)
        if is_lora(model):  # a LoRA student's checkpoint holds its adapters only (the base never changes)
            load_lora_state(model, contents.weights)
            missing, unexpected = [], []
        else:
            missing, unexpected = model.load_state_dict(contents.weights, strict=False)
        # Tied output weights are stored once; anything else missing means the wrong checkpoint.
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        real_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if real_missing or unexpected:
            raise LmdistillError(f"checkpoint {ckpt.path} does not fit this model: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        try:
            self.optimizer.load_state_dict(contents.optimizer)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {ckpt.path}: optimizer.pt does not fit this run's optimizer ({exc})") from exc
        state = contents.state
        self.scheduler.load_state_dict(state["scheduler"])
        # train.lr and the schedule's shape are this run's (resuming with a lower lr is allowed): the same
        # expression LambdaLR uses, so an unchanged config gives back the saved values bit for bit
        self.scheduler.base_lrs = [self.tc.lr for _ in self.optimizer.param_groups]
        for group, fn, base in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, self.scheduler.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * fn(self.scheduler.last_epoch)
        self.objective.load_state_dict(state["objective"])
        contents.restore_rng()
        self.step = int(state["data_position"]["next_step"])
        self.source.load_state_dict(state["data_position"].get("source", {}))

    def save_final(self, path: Path | None = None) -> Path:
        path = path or self.output_dir / "final"
        self._check_finite_state(f"the final model {path}")
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = path.with_name(path.name + ".tmp")
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                model = acc.unwrap_model(self.model)
                if is_lora(model):
                    save_lora_student(model, tmp, self.tokenizer, save=self.config.student.lora.save)
                else:
                    model.save_pretrained(tmp, safe_serialization=True)
                    self.tokenizer.save_pretrained(tmp)
                for f in sorted(tmp.rglob("*")):
                    if f.is_file():
                        file_sha256(f, fsync=True)  # on disk before the rename publishes it
                if path.exists():
                    shutil.rmtree(path)
                tmp.rename(path)
            except (OSError, RuntimeError, SafetensorError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                where = getattr(exc, "filename", None) or tmp
                raise LmdistillError(f"could not write the final model {path}: {io_failure(exc, path.parent)} ({where})") from exc
        acc.wait_for_everyone()
        self.close()
        return path

    def close(self) -> None:
        """End the run's hold on its output directory (lock, heartbeat); safe to call more than once."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        self.log.close()
        self.run_dir.release()

    def _checked_eval(self) -> dict[str, Any]:
        metrics = self.evaluate()
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            self._diverged(self.step, f"the validation {', '.join(bad)} became non-finite after step {self.step}")
        if self.show_progress and self.accelerator.is_main_process:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            print(f"eval at step {self.step}: {shown}", flush=True)
        return {"kind": "eval", "step": self.step, **metrics}

    # ------------------------------------------------------------------------------------- loop
    def train(self, resume: bool = False) -> TrainResult:
        """Train to ``train.steps`` (continuing the newest checkpoint with ``resume``). The output directory
        must not hold another run unless resumed (see :class:`RunDirectory`)."""
        acc = self.accelerator
        self.run_dir.acquire()  # again after an earlier train() of this trainer ended
        if self.run_dir.prepared_for is None or self.run_dir.prepared_for[0] != resume:
            self.run_dir.prepare(self.config, resume=resume)
            acc.wait_for_everyone()  # every rank checked the directory before the main process writes into it
        try:
            if resume and not self.resume():
                raise CheckpointError(f"--resume: no checkpoint found in {self.checkpoints.root}; start without --resume")
            if acc.is_main_process:  # the settings the next --resume compares with
                write_text_atomic(self.output_dir / "config.yaml", dump_config(self.config))
            if acc.num_processes > 1:
                timeout = collective_timeout_seconds()
                self.heartbeat = Heartbeat(self.output_dir, acc.process_index, acc.num_processes, min(30.0, max(0.5, timeout / 10)))
                self.heartbeat.start()
            return self._train_loop()
        except RuntimeError as exc:
            silent = self.heartbeat.silent_ranks() if self.heartbeat is not None else []
            self.close()
            if acc.num_processes > 1 and lost_rank(exc):
                first = str(exc).strip().splitlines()[0][:300]
                raise CollectiveTimeout(
                    f"rank {acc.process_index}: waiting for the other ranks failed at step {self.step + 1} ({first}); "
                    f"stopped answering: {', '.join(silent) if silent else 'no rank identified (all heartbeats recent)'}. "
                    f"The last complete checkpoint is kept; LMDISTILL_COLLECTIVE_TIMEOUT "
                    f"({collective_timeout_seconds():.0f}s) sets how long ranks wait"
                ) from exc
            raise
        except OSError as exc:  # a full disk, a read-only or vanished directory: one line naming the file
            self.close()
            raise LmdistillError(f"training stopped at step {self.step}: {io_failure(exc, self.output_dir)} "
                                 f"({exc.filename or self.output_dir})") from exc
        except BaseException:
            self.close()
            raise

    def _train_loop(self) -> TrainResult:
        acc = self.accelerator
        tokens_per_step = self.tc.batch_size * self.config.block_size
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
                if self.heartbeat is not None:
                    self.heartbeat.step = self.step + 1
                loss = self.train_step(self.step)
                self.step += 1
                elapsed = time.perf_counter() - start_time
                tps = (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                logger.debug("step %d: loss %.6f, lr %.4g, %.0f tokens/s", self.step, loss, self.scheduler.get_last_lr()[0], tps)
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
                    metrics = self._checked_eval()
                    history.append(metrics)
                    self.log.write(metrics)
                if self.step % self.config.checkpoint.every == 0 or self.step == self.tc.steps:
                    # older checkpoints go once the next step (or the final evaluation) shows this one is good
                    self.save_checkpoint(prune=False)
                    self._prune_pending = True
        train_seconds = time.perf_counter() - start_time
        final = self._checked_eval()
        if self._prune_pending:
            self._prune_checkpoints()
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
