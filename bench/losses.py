#!/usr/bin/env python
"""Time and peak memory of the distillation objectives: plain path, chunked path, TRL's generalized JSD.

For each objective at tokens=4096, hidden=512 and vocab in {32k, 128k} this measures one forward+backward
through the student's output layer and the loss:

* floor   - the output-layer matmul alone (``hidden @ W^T`` forward + backward, no loss);
* plain   - full ``[N, V]`` logits, ``objective.per_token`` + ``reduce_tokens``, autograd;
* chunked - ``fused_linear_distill`` (the logits are never materialised);
* TRL     - ``GKDTrainer.generalized_jsd_loss`` on full logits (beta 0 / 0.5 / 1 against forward KL / JSD /
  reverse KL).

Each measurement runs in its own subprocess, so the peak is that of the measured call alone: the peak
resident set (VmHWM, reset through /proc/self/clear_refs after the inputs exist and free heap memory is
returned with malloc_trim) minus the resident set before the call. Inputs (hidden states, weights, the
dense teacher logits) are not counted; gradients, logits, softmaxes and buffers are. A measurement whose
predicted peak (4x the 32k one for 128k) exceeds ``--mem-budget-gb`` or the available memory is skipped
with the reason printed; nothing is extrapolated into the table.

Usage: ``python bench/losses.py`` (all), ``--vocabs 32768`` (quick), ``--objectives forward_kl,jsd``;
``LMDISTILL_COMPILE=0 python bench/losses.py`` times the chunked path's eager kernels instead of the compiled ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from memprobe import reset_peak, status_kb  # noqa: E402  (bench/, beside this script)

OBJECTIVES: dict[str, tuple[object, float | None]] = {
    "forward_kl": ("forward_kl", 0.0),
    "reverse_kl": ("reverse_kl", 1.0),
    "jsd(0.5)": ({"name": "jsd", "beta": 0.5}, 0.5),
    "tvd": ("tvd", None),
    "skew_kl(0.1)": ("skew_kl", None),
    "skew_reverse_kl(0.1)": ("skew_reverse_kl", None),
    "taid": ("taid", None),
    "atkd": ("atkd", None),
    "sinkd(group 64)": ({"name": "sinkd", "group_size": 64}, None),
    "sinkd(group 16)": ({"name": "sinkd", "group_size": 16}, None),
    "cross_entropy": ("cross_entropy", None),
    "0.5 fkl + 0.5 ce": ({"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}, None),
}


# ------------------------------------------------------------------------------------------ worker side
def worker(job: dict) -> dict:
    import torch

    from lmdistill.losses import build_objective, fused_linear_distill, reduce_tokens

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    n, h, v, path = job["tokens"], job["hidden"], job["vocab"], job["path"]
    torch.manual_seed(0)

    def make(tokens: int):
        hidden = torch.randn(tokens, h).requires_grad_(True)
        weight = torch.randn(v, h).mul_(3.0 / h**0.5).requires_grad_(True)
        t_hidden = torch.randn(tokens, h)
        t_weight = torch.randn(v, h).mul_(3.0 / h**0.5)
        labels = torch.randint(0, v, (tokens,))
        labels[::10] = -100
        teacher_logits = None
        if path in ("plain", "trl") or (path == "chunked" and job["teacher"] == "logits"):
            teacher_logits = torch.empty(tokens, v)
            torch.mm(t_hidden, t_weight.T, out=teacher_logits)
        grad_out = torch.randn(tokens, v) if path == "floor" else None
        return hidden, weight, (t_hidden, t_weight), teacher_logits, labels, grad_out

    objective = build_objective(OBJECTIVES[job["objective"]][0]) if path != "floor" else None
    if objective is not None and objective.name == "taid":
        objective.t = 0.7  # mid-schedule, not a special-cased endpoint
    beta = OBJECTIVES[job["objective"]][1] if path == "trl" else None
    if path == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer

    def run(inputs) -> float:
        hidden, weight, pair, teacher_logits, labels, grad_out = inputs
        hidden.grad = None
        weight.grad = None
        if path == "floor":
            (hidden @ weight.T).backward(grad_out)
            return 0.0
        if path == "plain":
            loss = reduce_tokens(objective.per_token(hidden @ weight.T, teacher_logits, labels), labels)
        elif path == "trl":
            loss = GKDTrainer.generalized_jsd_loss((hidden @ weight.T)[None], teacher_logits[None], labels=labels[None], beta=beta)
        else:
            teacher = teacher_logits if job["teacher"] == "logits" else pair
            teacher = None if not objective.requires_teacher else teacher
            loss = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=job["chunk_size"])
        loss.backward()
        return float(loss)

    def floor_time(inputs) -> float:
        """The output-layer matmul alone, same inputs, same process (other processes load the CPUs unevenly)."""
        hidden, weight = inputs[0], inputs[1]
        grad_out = torch.full((hidden.shape[0], v), 1e-3)
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        (hidden @ weight.T).backward(grad_out)
        elapsed = time.perf_counter() - start
        hidden.grad = weight.grad = None
        return elapsed

    run(make(256))  # warm up threads and kernels on a small problem
    inputs = make(n)
    floors = [floor_time(inputs)] if job["floor_ratio"] and path != "floor" else []
    times, peaks, loss = [], [], 0.0
    for _ in range(job["repeats"]):
        inputs[0].grad = None
        inputs[1].grad = None
        before = reset_peak()
        start = time.perf_counter()
        loss = run(inputs)
        times.append(time.perf_counter() - start)
        peaks.append(status_kb("VmHWM") - before)
    if floors:
        floors.append(floor_time(inputs))
    result = {"time_s": min(times), "peak_gb": max(peaks) / 2**20, "loss": loss}
    if floors:
        result["floor_s"] = sum(floors) / len(floors)
    return result


# -------------------------------------------------------------------------------------------- main side
def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    return 0.0


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def launch(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode == -9:  # SIGKILL: on this kind of run, the kernel's out-of-memory killer
        return {"error": "killed by SIGKILL (out of memory: the kernel's OOM killer)"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_time(result: dict | None, floor: float | None) -> str:
    """Seconds, and the ratio to the floor measured in the same process (or to the table's floor)."""
    if not result:
        return "-"
    if "skipped" in result:
        return "skipped"
    if "error" in result:
        return "failed"
    floor = result.get("floor_s", floor)
    ratio = f" ({result['time_s'] / floor:.2f}x)" if floor else ""
    return f"{result['time_s']:.2f}{ratio}"


def fmt_mem(result: dict | None) -> str:
    if not result:
        return "-"
    if "skipped" in result or "error" in result:
        return "-"
    return f"{result['peak_gb']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocabs", default="32768,131072")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (min time, max peak)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: library default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    parser.add_argument("--mem-budget-gb", type=float, default=10.0)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-floor-ratio", action="store_true",
                        help="do not time the floor again inside each measurement (faster, noisier ratios)")
    parser.add_argument("--no-big-jsd", action="store_true", help="skip JSD at 128k with 16384 tokens")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    from lmdistill.losses import default_chunk_size

    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown objectives {unknown}; choose from {list(OBJECTIVES)}")
    vocabs = [int(v) for v in args.vocabs.split(",")]
    base = {"tokens": args.tokens, "hidden": args.hidden, "repeats": args.repeats, "chunk_size": args.chunk_size,
            "threads": args.threads, "teacher": "logits", "floor_ratio": not args.no_floor_ratio}
    print(f"# lmdistill loss benchmark: tokens={args.tokens}, hidden={args.hidden}, fp32, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads or torch.get_num_threads()}")
    print(f"# load average at start: {load_average()} (other processes share the CPUs: compare within a table)")
    from lmdistill.losses.fused import ENV_VAR, compile_enabled

    print(f"# chunked path: {'compiled kernels' if compile_enabled() else 'eager kernels'} ({ENV_VAR}={os.environ.get(ENV_VAR, '1')}; "
          "compiled once per worker in the warm-up, not timed)")
    print(f"# peak = extra resident memory of one forward+backward, inputs excluded; time = min of {args.repeats} runs")
    if not args.no_floor_ratio:
        print("# (x floor) = time / mean of two floor timings (matmul alone) taken in the same process just before and after")
    measured: dict[tuple, dict] = {}

    def guarded(job: dict, predicted_gb: float | None) -> dict:
        if predicted_gb is not None:
            limit = min(args.mem_budget_gb, available_gb() - 1.0)
            if predicted_gb > limit:
                reason = f"predicted peak {predicted_gb:.1f} GB > limit {limit:.1f} GB"
                print(f"  skip {job['path']} {job.get('objective', '')} V={job['vocab']} N={job['tokens']}: {reason}", flush=True)
                return {"skipped": reason}
        result = launch(job)
        what = f"{job['path']:8s} {job.get('objective', ''):22s} V={job['vocab']} N={job['tokens']}"
        if "error" in result:
            print(f"  {what}: FAILED {result['error']}", flush=True)
        else:
            floor_note = f" (floor {result['floor_s']:.2f} s)" if "floor_s" in result else ""
            print(f"  {what}: {result['time_s']:.2f} s{floor_note}, {result['peak_gb']:.2f} GB", flush=True)
        return result

    for vocab in vocabs:
        scale_from_small = vocab / vocabs[0] if vocab != vocabs[0] else None
        chunk = args.chunk_size or default_chunk_size(vocab, args.tokens)
        print(f"\n## vocab {vocab} (chunked: {chunk} rows per chunk)", flush=True)

        def predicted(path: str, objective: str) -> float | None:
            small = measured.get((vocabs[0], path, objective))
            if scale_from_small is None or not small or "peak_gb" not in small:
                return None
            return small["peak_gb"] * scale_from_small

        floor = guarded({**base, "vocab": vocab, "path": "floor", "objective": "forward_kl"}, predicted("floor", "forward_kl"))
        measured[(vocab, "floor", "forward_kl")] = floor
        for name in names:
            for path in ("plain", "chunked") + (("trl",) if OBJECTIVES[name][1] is not None and not args.no_trl else ()):
                job = {**base, "vocab": vocab, "path": path, "objective": name}
                measured[(vocab, path, name)] = guarded(job, predicted(path, name) if path != "chunked" else None)

        floor_s = floor.get("time_s")
        print(f"\n| vocab {vocab} | plain s (x floor) | plain GB | chunked s (x floor) | chunked GB | chunked/plain GB | TRL s (x floor) | TRL GB |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| floor: hidden @ W^T fwd+bwd | {fmt_time(floor, None)} | {fmt_mem(floor)} | | | | | |")
        for name in names:
            plain = measured.get((vocab, "plain", name))
            chunked = measured.get((vocab, "chunked", name))
            trl = measured.get((vocab, "trl", name))
            ratio = "-"
            if plain and chunked and "peak_gb" in plain and "peak_gb" in chunked and plain["peak_gb"] > 0:
                ratio = f"{chunked['peak_gb'] / plain['peak_gb']:.3f}"
            trl_label = f"{fmt_time(trl, floor_s)} (beta={OBJECTIVES[name][1]:g})" if trl else "-"
            print(f"| {name} | {fmt_time(plain, floor_s)} | {fmt_mem(plain)} | {fmt_time(chunked, floor_s)} | "
                  f"{fmt_mem(chunked)} | {ratio} | {trl_label} | {fmt_mem(trl)} |")
        for (v, path, name), result in measured.items():
            if v == vocab and "skipped" in result:
                print(f"- {path} {name}: skipped, {result['skipped']}")
            if v == vocab and "error" in result:
                print(f"- {path} {name}: failed, {result['error']}")

        # what does fit: the skipped full-logits paths of the headline objectives at fewer tokens
        fewer = []
        for name in [n for n in ("forward_kl", "jsd(0.5)") if n in names]:
            for path in ("plain", "trl"):
                result = measured.get((vocab, path, name))
                if not result or "skipped" not in result:
                    continue
                full = predicted(path, name)
                for divisor in (2, 4, 8):
                    tokens = args.tokens // divisor
                    estimate = None if full is None else full / divisor
                    if estimate is not None and estimate > min(args.mem_budget_gb, available_gb() - 1.0):
                        continue
                    job = {**base, "tokens": tokens, "vocab": vocab, "path": path, "objective": name, "repeats": 1}
                    fewer.append((path, name, tokens, guarded(job, estimate)))
                    break
        if fewer:
            print(f"\n| vocab {vocab}, full-logits paths at fewer tokens (measured) | tokens | s (x floor) | GB |")
            print("|---|---|---|---|")
            for path, name, tokens, result in fewer:
                label = f"{path} {name}" + (f" (TRL beta={OBJECTIVES[name][1]:g})" if path == "trl" else "")
                print(f"| {label} | {tokens} | {fmt_time(result, None)} | {fmt_mem(result)} |")

    big_vocab = max(vocabs)
    if not args.no_big_jsd and big_vocab >= 131072 and "jsd(0.5)" in OBJECTIVES:
        tokens = 4 * args.tokens
        print(f"\n## jsd(0.5), vocab {big_vocab}, {tokens} tokens, chunked, teacher given as (hidden, weight)", flush=True)
        job = {**base, "tokens": tokens, "vocab": big_vocab, "path": "chunked", "objective": "jsd(0.5)", "teacher": "hidden_weight", "repeats": 1}
        result = guarded(job, None)
        plain_small = measured.get((big_vocab, "plain", "jsd(0.5)"))
        print(f"| jsd(0.5) chunked, V={big_vocab}, N={tokens} | {fmt_time(result, None)} s | {fmt_mem(result)} GB extra |")
        if plain_small and "skipped" in plain_small:
            print(f"  (plain at N={args.tokens} was already skipped: {plain_small['skipped']})")
    print(f"\n# load average at end: {load_average()}")


if __name__ == "__main__":
    main()
