#!/usr/bin/env python
"""Fault injection on tiny real runs: does a run survive what happens to real runs?

Each fault is tried a few times on a 1-layer GPT-2 student distilled from a 2-layer teacher on 300 KJV
chapters, and counted as *survived* when lmdistill does the right thing:

* SIGKILL during ``lmdistill distill``, at a random moment, then ``--resume`` (``--overwrite`` when the kill
  came before the first checkpoint): the final model is bit-identical to an uninterrupted run.
* one changed byte in a random file of the newest checkpoint: the resume warns naming the file, falls back to
  the previous checkpoint, and the final model is bit-identical to an uninterrupted run.
* learning rate 1e3, eager kernels (plain and chunked loss) and compiled kernels (chunked): the run stops with
  TrainingDiverged, writes no final model and no non-finite tensor, and the kept checkpoint evaluates finite.
* a planted pickle (unpickling it would create a marker file) as the embedding signal cache and as a
  checkpoint's optimizer state with a matching checksum: the marker never appears and the run goes on.
* a second ``lmdistill pretrain`` on the directory of a running one: refused at once (exit 2); the first
  finishes intact (every step logged once, every checkpoint matching its checksums).
* a read-only output directory (a read-only tmpfs when run as root, else a 0555 directory): one-line error
  (exit 2) before any model loads.
* a full disk (a 400 KiB tmpfs, root only): one-line error naming the file, no partial checkpoint left.

Usage::

    python bench/faults.py                # about 3-5 minutes on 2 CPU cores
    python bench/faults.py --kills 5      # more SIGKILL trials
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

STEPS = 12


class Bench:
    def __init__(self, work: Path) -> None:
        from lmdistill.data.corpora import read_kjv
        from lmdistill.data.prepare import prepare_data
        from tests.conftest import save_tiny_model

        self.work = work
        self.corpus = work / "kjv_small.txt"
        self.corpus.write_text("\n\n".join(doc.text for doc in list(read_kjv())[:300]) + "\n", encoding="utf-8")
        self.cache = work / "cache"
        tokenizer = prepare_data(str(self.corpus), block_size=32, vocab_size=512, cache_dir=self.cache).tokenizer
        self.teacher = save_tiny_model(work / "teacher", tokenizer, layers=2, hidden=48, seed=1)
        self.student = save_tiny_model(work / "student", tokenizer, layers=1, hidden=32, seed=2)
        self.runs = 0
        self.reference_cli: dict[str, torch.Tensor] | None = None
        self.cli_seconds = 0.0

    def raw(self, out: Path, **sections) -> dict:
        raw = {
            "output_dir": str(out),
            "data": {"corpus": str(self.corpus), "block_size": 32, "cache_dir": str(self.cache)},
            "student": {"path": str(self.student)}, "teacher": {"path": str(self.teacher)}, "objective": "forward_kl",
            "train": {"steps": STEPS, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "log_every": 1},
            "eval": {"every": 1000, "max_batches": 2, "batch_size": 8},
            "checkpoint": {"every": 2, "keep": 2},
        }
        for key, value in sections.items():
            raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and value is not None else value
        return {k: v for k, v in raw.items() if v is not None}

    def fresh(self, name: str) -> Path:
        self.runs += 1
        path = self.work / f"{self.runs:02d}-{name}"
        path.mkdir()
        return path

    def config_file(self, where: Path, **sections) -> Path:
        path = where / "config.yaml"
        path.write_text(yaml.safe_dump(self.raw(where / "run", **sections)), encoding="utf-8")
        return path

    def config(self, where: Path, **sections):
        from lmdistill.config import validate_config

        return validate_config(self.raw(where / "run", **sections), "bench faults")


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "lmdistill.cli", *args], env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_error_line(err: str) -> str | None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return lines[0] if len(lines) == 1 and "Traceback" not in err else None


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def nonfinite(root: Path) -> list[str]:
    bad = []
    for path in root.rglob("*.safetensors"):
        bad += [f"{path}:{k}" for k, v in load_file(str(path)).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    for path in root.rglob("optimizer.pt"):
        state = torch.load(path, weights_only=True)["state"]
        bad += [f"{path}:{i}.{k}" for i, s in state.items() for k, v in s.items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return bad


# ------------------------------------------------------------------------------------------ faults
def reference_cli_run(b: Bench) -> None:
    where = b.fresh("reference")
    started = time.perf_counter()
    code, _, err = finish(cli("distill", str(b.config_file(where))))
    if code != 0:
        raise SystemExit(f"the uninterrupted reference run failed:\n{err[-3000:]}")
    b.cli_seconds = time.perf_counter() - started
    b.reference_cli = weights(where / "run")


def sigkill_and_resume(b: Bench, rng: random.Random) -> tuple[bool, str]:
    where = b.fresh("sigkill")
    cfg = b.config_file(where)
    delay = rng.uniform(0.3, 0.95) * b.cli_seconds
    proc = cli("distill", str(cfg))
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    run = where / "run"
    latest = (run / "checkpoints" / "latest").read_text().strip() if (run / "checkpoints" / "latest").exists() else "none"
    code, _, err = finish(cli("distill", str(cfg), "--resume"))
    how = "--resume"
    if code != 0 and "no checkpoint found" in err:
        code, _, err = finish(cli("distill", str(cfg), "--overwrite"))
        how = "--overwrite"
    ok = code == 0 and same(weights(run), b.reference_cli)
    return ok, f"killed after {delay:.1f}s (latest: {latest}), {how}: " + ("bit-identical" if ok else f"rc {code} {err[-300:]}")


def killed_in_process(b: Bench, where: Path, kill_before_step: int):
    from lmdistill.train.run import build_trainer

    cfg = b.config(where)
    trainer, _ = build_trainer(cfg, show_progress=False)
    original = trainer.train_step

    def dies(step):
        if step + 1 == kill_before_step:
            raise KeyboardInterrupt
        return original(step)

    trainer.train_step = dies
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    trainer.close()
    return cfg


def damaged_byte(b: Bench, rng: random.Random, reference: dict[str, torch.Tensor]) -> tuple[bool, str]:
    from lmdistill.train.checkpoint import CHECKSUMS
    from lmdistill.train.run import build_trainer

    where = b.fresh("damaged")
    cfg = killed_in_process(b, where, kill_before_step=STEPS - 1)
    newest = sorted((where / "run" / "checkpoints").glob("step-*"))[-1]
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
    rel = target.relative_to(newest).as_posix()
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lmdistill.train.checkpoint")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        trainer, _ = build_trainer(cfg, show_progress=False, resume=True)
        trainer.train(resume=True)
        trainer.save_final()
    finally:
        logger.removeHandler(handler)
    named = any(rel in r and newest.name in r for r in records)
    ok = named and same(weights(where / "run"), reference)
    return ok, f"{newest.name}/{rel} byte {offset}: " + ("named, fell back, bit-identical" if ok else f"warnings {records}")


def huge_lr(b: Bench, chunked: bool, compiled: bool) -> tuple[bool, str]:
    from lmdistill.losses import fused
    from lmdistill.train.checkpoint import CheckpointManager
    from lmdistill.train.run import build_trainer, run_training
    from lmdistill.train.trainer import TrainingDiverged

    os.environ[fused.ENV_VAR] = "1" if compiled else "0"
    fused._failed.clear()
    where = b.fresh("huge-lr")
    cfg = b.config(where, train={"lr": 1e3, "warmup_steps": 0, "chunked_loss": chunked})
    try:
        run_training(cfg, show_progress=False)
        return False, "finished without stopping"
    except TrainingDiverged as exc:
        message = str(exc)
    finally:
        os.environ[fused.ENV_VAR] = "0"
    run = where / "run"
    kept = CheckpointManager(run).latest()
    bad = nonfinite(run)
    if (run / "final").exists() or bad or kept is None:
        return False, f"final: {(run / 'final').exists()}, non-finite: {bad[:3]}, kept: {kept}"
    calm = b.config(where, train={"lr": 1e-3, "warmup_steps": 0, "chunked_loss": chunked})
    trainer, _ = build_trainer(calm, show_progress=False, resume=True)
    trainer.resume()
    metrics = trainer.evaluate()
    trainer.close()
    finite = all(math.isfinite(v) for v in metrics.values())
    used = compiled and "forward_kl_grad" in fused._compiled and not fused._failed
    note = f"{message.split(';')[0]}; kept {kept.path.name}, evaluates {'finite' if finite else metrics}"
    return finite and (used or not compiled), note + ("" if used or not compiled else "; compiled kernels NOT used")


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def planted_signal_cache(b: Bench) -> tuple[bool, str]:
    from lmdistill.embed.config import parse_config
    from lmdistill.embed.run import _signal_cache_file, training_signal
    from tests.embed.test_training import toy_task

    where = b.fresh("planted-signal")
    marker = where / "pwned"
    task = toy_task()
    cfg = parse_config({"method": "m3", "task": {"cache_dir": str(where)}, "mining": {"top_k": 2}})
    path = _signal_cache_file(cfg, task)
    with open(path, "wb") as f:
        torch.save(_Planted(marker), f)
    signal_ = training_signal(cfg, task)
    ok = not marker.exists() and len(signal_.negatives) == len(task.train)
    return ok, "signal cache: " + ("not run, rebuilt" if ok else "MARKER CREATED")


def planted_checkpoint(b: Bench) -> tuple[bool, str]:
    from lmdistill.train.checkpoint import CHECKSUMS, file_sha256
    from lmdistill.train.run import build_trainer

    where = b.fresh("planted-ckpt")
    cfg = killed_in_process(b, where, kill_before_step=7)
    newest = sorted((where / "run" / "checkpoints").glob("step-*"))[-1]
    marker = where / "pwned"
    torch.save({"state": _Planted(marker)}, newest / "optimizer.pt")
    manifest = json.loads((newest / CHECKSUMS).read_text())
    manifest["sha256"]["optimizer.pt"] = file_sha256(newest / "optimizer.pt")
    (newest / CHECKSUMS).write_text(json.dumps(manifest))
    trainer, _ = build_trainer(cfg, show_progress=False, resume=True)
    trainer.train(resume=True)
    trainer.close()
    ok = not marker.exists()
    return ok, f"{newest.name}/optimizer.pt: " + ("refused, fell back, finished" if ok else "MARKER CREATED")


def concurrent(b: Bench) -> tuple[bool, str]:
    """The second run starts once the first is training (its first metrics line), long enough (120 label-only
    steps) that it is still training when the second gets to its lock; the first must end intact: every step
    logged once, every checkpoint matching its checksums."""
    from lmdistill.train.checkpoint import CheckpointManager

    where = b.fresh("concurrent")
    steps = 120
    # label-only (pretrain, no teacher forward): many cheap steps keep the first run training while the second starts
    cfg = b.config_file(where, teacher=None, objective="cross_entropy", tokenizer={"path": str(b.student)},
                        train={"steps": steps}, checkpoint={"every": 20, "keep": 2})
    first = cli("pretrain", str(cfg))
    metrics = where / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    if first.poll() is not None:
        return False, f"the first run ended before training: {first.communicate()[1][-300:]}"
    code2, _, err2 = finish(cli("pretrain", str(cfg)))
    still_training = first.poll() is None
    code1, _, err1 = finish(first)
    line = one_error_line(err2) or ""
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if json.loads(x)["kind"] == "train"]
    checkpoints = CheckpointManager(where / "run").complete()
    for ckpt in checkpoints:
        CheckpointManager.verify(ckpt)
    intact = logged == list(range(1, steps + 1)) and [c.step for c in checkpoints] == [steps - 20, steps]
    ok = code2 == 2 and "in use by another run" in line and still_training and code1 == 0 and intact
    return ok, (f"second: rc {code2} while the first was {'still' if still_training else 'no longer'} training "
                f"({line[7:80]}...); first: rc {code1}, " + ("intact" if intact else f"NOT intact {err1[-300:]}"))


def _mount_tmpfs(path: Path, options: str) -> bool:
    return os.geteuid() == 0 and os.system(f"mount -t tmpfs -o {options} tmpfs {path} 2>/dev/null") == 0


def read_only(b: Bench) -> tuple[bool, str]:
    where = b.fresh("read-only")
    target = where / "ro"
    target.mkdir()
    mounted = _mount_tmpfs(target, "ro,size=64k")
    if not mounted:
        target.chmod(0o555)
    try:
        cfg_path = where / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(b.raw(target / "run")), encoding="utf-8")
        code, _, err = finish(cli("distill", str(cfg_path)))
    finally:
        if mounted:
            os.system(f"umount {target}")
        else:
            target.chmod(0o755)
    line = one_error_line(err) or ""
    before_models = "Loading weights" not in err
    ok = code == 2 and "is not writable" in line and before_models
    return ok, f"{'read-only tmpfs' if mounted else 'chmod 0555'}: rc {code}, before models load: {before_models}: {line[:110]}"


def disk_full(b: Bench) -> tuple[bool, str] | None:
    from lmdistill.errors import LmdistillError
    from lmdistill.train.run import run_training

    where = b.fresh("disk-full")
    target = where / "small"
    target.mkdir()
    if not _mount_tmpfs(target, "size=400k"):
        return None
    message = ""
    try:
        run_training(b.config(target, checkpoint={"every": 1, "keep": 5}), show_progress=False)
    except LmdistillError as exc:
        message = str(exc)
    finally:
        import gc

        gc.collect()  # a failed torch.save's open file lives until its traceback goes
        os.system(f"umount {target}")
    ok = "No space left on device" in message and "\n" not in message and str(target) in message
    return ok, message[:160] or "no error"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL trials")
    parser.add_argument("--damages", type=int, default=3, help="changed-byte trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="lmdistill-faults-"))
    started = time.perf_counter()
    rows: list[tuple[str, int, int]] = []
    notes: list[str] = []

    def trial(fault: str, runs: list[Callable[[], tuple[bool, str] | None]]) -> None:
        results = []
        for run in runs:
            try:
                result = run()
            except Exception as exc:  # a fault that crashes the bench counts as not survived
                result = (False, f"{type(exc).__name__}: {str(exc)[:300]}")
            if result is not None:
                results.append(result)
                notes.append(f"{fault}: {'ok' if result[0] else 'FAILED'}: {result[1]}")
        if results:
            rows.append((fault, len(results), sum(ok for ok, _ in results)))
        else:
            notes.append(f"{fault}: skipped (needs root to mount a tmpfs)")
        print(f"[{time.perf_counter() - started:5.0f}s] {fault}: {sum(ok for ok, _ in results)}/{len(results)}", flush=True)

    try:
        b = Bench(work)
        reference_cli_run(b)
        trial("SIGKILL during distill, then resume", [lambda: sigkill_and_resume(b, rng) for _ in range(args.kills)])
        from lmdistill.train.run import build_trainer

        ref_where = b.fresh("reference-in-process")
        trainer, _ = build_trainer(b.config(ref_where), show_progress=False)
        trainer.train()
        trainer.save_final()
        reference = weights(ref_where / "run")
        trial("changed byte in the newest checkpoint", [lambda: damaged_byte(b, rng, reference) for _ in range(args.damages)])
        trial("lr 1e3, eager kernels (plain, chunked)", [lambda: huge_lr(b, False, False), lambda: huge_lr(b, True, False)])
        trial("lr 1e3, compiled kernels (chunked)", [lambda: huge_lr(b, True, True)])
        trial("planted pickle (signal cache, checkpoint)", [lambda: planted_signal_cache(b), lambda: planted_checkpoint(b)])
        trial("second run on a running run's directory", [lambda: concurrent(b)])
        trial("read-only output directory", [lambda: read_only(b)])
        trial("full disk (400 KiB tmpfs)", [lambda: disk_full(b)])
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| fault | trials | survived |")
    print("|---|---|---|")
    for fault, trials, survived in rows:
        print(f"| {fault} | {trials} | {survived} |")
    print()
    for note in notes:
        print(f"- {note}")
    print(f"\n{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
