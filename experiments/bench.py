"""``python -m experiments.bench``: TAPS speed against plain fine-tuning, measured in one process.

Same model, batch, resolution, precision and thread count for every side; warm-up excluded;
the median and min-max of several repeats. Prints a table and writes a JSON file.
Ratios: training step time and peak training memory TAPS / fine-tuning (lower is better),
for TAPS as shipped (gated weight rebuilt in backward) and with ``recompute_weight=False``
(gated weight saved from forward); the memory floor ``1 + base weight bytes / fine-tuning
peak`` (TAPS must hold the frozen base beside the task weights); inference throughput of the
gated and the merged model / the plain timm model (higher is better); bytes of one
``save_task`` file / a full model file. The LoRA baseline (PEFT, rank 8, one task) is timed and
measured in the same rounds: its step time and peak memory / fine-tuning and / TAPS. Every row
records the machine, CPU, thread count, torch and commit it was made on.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch
import torch.nn.functional as F

import taps_lightning as tl

from experiments.run.provenance import provenance
from taps_lightning.errors import run_command
from taps_lightning.files.atomic import atomic_write, check_replaceable


def _once(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _interleaved(fns, repeats: int, warmup: int) -> list[list[float]]:
    """Time ``fns`` in turn (A B C A B C ...) so drifts in machine speed hit all of them."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(_once(fn))
    return times


def _ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``num / den``."""
    r = [a / b for a, b in zip(num, den)]
    return statistics.median(r), min(r), max(r)


def _train_step(model, x, y, dtype):
    """One SGD step (momentum 0.9) over the model's trainable parameters, as a closure."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    step.model, step.optimizer = model, opt
    return step


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_training_bytes(step) -> int:
    """Peak bytes held during one training step (after warm-up), measured the same way for
    any model: on CUDA the caching allocator's peak; on CPU the tensors alive before the
    step (parameters, buffers, optimizer state; gradients are freed by ``zero_grad``) plus
    the highest running total of the allocations the profiler records during the step."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    model, opt = step.model, step.optimizer
    opt.zero_grad(set_to_none=True)
    state = [v for s in opt.state.values() for v in s.values()]
    static = _tensor_bytes(list(model.parameters()) + list(model.buffers()) + state)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return static + peak


#: TAPS as shipped (gated weight rebuilt in backward), and with the gated weight saved instead.
TAPS_VARIANTS = ("taps", "taps_saved_weight")
#: The LoRA baseline's rank in the benchmark (PEFT's default, the rank of the results' middle row).
LORA_RANK = 8
#: Every side measured against fine-tuning: the TAPS variants and the LoRA baseline.
SIDES = (*TAPS_VARIANTS, "lora")


def build(arch: str, side: str, size: int) -> torch.nn.Module:
    """The plain timm model (``finetune``), one of :data:`TAPS_VARIANTS` or the LoRA baseline
    (``lora``), with one 10-class task."""
    kwargs = {"img_size": size} if arch.startswith("vit") else {}
    if side == "finetune":
        return timm.create_model(arch, num_classes=10, **kwargs)
    if side == "lora":
        return tl.LoRAModel(timm.create_model(arch, num_classes=0, **kwargs), {"t": 10}, rank=LORA_RANK)
    return tl.TapsModel(timm.create_model(arch, num_classes=0, **kwargs), {"t": 10},
                        recompute_weight=side == "taps")


def process_peak_rss(arch: str, side: str, batch: int, size: int, precision: str, steps: int = 3) -> int:
    """Peak resident set size (bytes) of a fresh process that trains only ``side`` for a few
    steps: what ``top`` shows, libraries and allocator slack included (CPU only)."""
    code = ("import sys, experiments.bench as b; "
            "b._rss_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))")
    out = subprocess.run([sys.executable, "-c", code, arch, side, str(batch), str(size), precision, str(steps)],
                         check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return int(out.stdout.strip().splitlines()[-1])


def _rss_worker(arch: str, side: str, batch: int, size: int, precision: str, steps: int) -> None:
    torch.manual_seed(0)
    model = build(arch, side, size)
    step = _train_step(model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)),
                       torch.bfloat16 if precision == "bf16" else None)
    for _ in range(steps):
        step()
    print(_peak_rss())


def _peak_rss() -> int:
    """This process's peak RSS in bytes. Linux: ``VmHWM`` (``ru_maxrss`` would carry the
    parent's peak across fork+exec); elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def profile_steps(arch: str, batch: int, size: int, device: str, dtype, steps: int = 4, top: int = 8) -> list[tuple]:
    """Where the TAPS step spends its extra time: ``(op, fine-tuning ms, TAPS ms)`` per step
    from ``torch.profiler`` for every operator, largest difference first, then the totals;
    prints the ``top`` ones."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sides = ("finetune", "taps")
    models = {side: build(arch, side, size).to(device) for side in sides}
    runs = {side: _train_step(m, x, y, dtype) for side, m in models.items()}
    totals = {side: Counter() for side in sides}
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for side in sides:
        runs[side](); runs[side]()
    for _ in range(steps):  # alternate, one step per profile, as the timing does
        for side in sides:
            with profile(activities=activities) as prof:
                runs[side]()
            for event in prof.key_averages():
                us = event.self_device_time_total if cuda else event.self_cpu_time_total
                totals[side][event.key] += us / 1e3 / steps
    rows = [(key, totals["finetune"][key], totals["taps"][key]) for key in set(totals["finetune"]) | set(totals["taps"])]
    rows.sort(key=lambda r: -abs(r[2] - r[1]))
    rows.append(("total", sum(totals["finetune"].values()), sum(totals["taps"].values())))
    print(f"\n{arch}: self {'GPU' if cuda else 'CPU'} ms per step (torch.profiler, {steps} steps each)\n| op | fine-tuning | TAPS | difference |\n|---|---:|---:|---:|")
    for key, ft, tp in rows[:top] + rows[-1:]:
        print(f"| {key[:60]} | {ft:.1f} | {tp:.1f} | {tp - ft:+.1f} |")
    return rows


def bench(arch: str, batch: int, size: int, repeats: int, warmup: int, device: str, dtype,
          memory_only: bool = False, inference_repeats: int = 40) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    plain = build(arch, "finetune", size).to(device)
    variants = {name: build(arch, name, size).to(device) for name in SIDES}
    res: dict = {"arch": arch, "batch": batch, "size": size, "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
                 **provenance()}
    steps = {name: _train_step(m, x, y, dtype) for name, m in variants.items()}
    steps["finetune"] = _train_step(plain, x, y, dtype)
    for step in steps.values():
        step()  # optimizer state exists, as in a running job
    res["peak_bytes"] = {name: peak_training_bytes(step) for name, step in steps.items()}
    base_bytes = _tensor_bytes(list(variants["taps"].shared_parameters()))
    res["memory_floor"] = 1 + base_bytes / res["peak_bytes"]["finetune"]
    for name in variants:
        res[f"memory_ratio_{name}"] = res["peak_bytes"][name] / res["peak_bytes"]["finetune"]
    res["memory_ratio"] = res["memory_ratio_taps"]
    res["memory_ratio_lora_taps"] = res["peak_bytes"]["lora"] / res["peak_bytes"]["taps"]
    if memory_only:
        return res
    names = list(steps)
    times = dict(zip(names, _interleaved([steps[n] for n in names], repeats, warmup)))
    res["train_step_ms"] = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    res["spread"] = {}
    for name in variants:
        med, lo, hi = _ratio(times[name], times["finetune"])
        res[f"train_step_ratio_{name}"] = med
        res["spread"][f"train_step_ratio_{name}"] = [lo, hi]
    res["train_step_ratio"] = res["train_step_ratio_taps"]
    med, lo, hi = _ratio(times["lora"], times["taps"])
    res["train_step_ratio_lora_taps"] = med
    res["spread"]["train_step_ratio_lora_taps"] = [lo, hi]
    taps = variants["taps"]
    plain.eval(); taps.eval()
    merged = tl.merge(taps, "t").to(device).eval()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        g, m, p = _interleaved([lambda: taps(x), lambda: merged(x), lambda: plain(x)], inference_repeats, warmup)
    res["gated_inference_throughput_ratio"] = _ratio(p, g)[0]
    res["merged_inference_throughput_ratio"] = _ratio(p, m)[0]
    with tempfile.TemporaryDirectory() as tmp:
        task_file = tl.save_task(taps, "t", os.path.join(tmp, "t.safetensors"))
        full = os.path.join(tmp, "full.pt")
        torch.save(plain.state_dict(), full)
        res["stored_bytes_ratio"] = os.path.getsize(task_file) / os.path.getsize(full)
    res["count_params_fraction"] = tl.count_params(taps, "t")["fraction"]
    return res


def training_costs(repeats: int, warmup: int, budget: float = 0.3, batches: int | None = None) -> dict:
    """On the offline default set-up (MobileNetV2, the four embedded digit tasks, batch 32 per task
    at 64 px, incremental TAPS): the time of one BatchNorm re-estimation (every task, ``batches``
    batches each: ``--model.recalibrate_batches``' default) as a ratio to one training epoch (the
    epoch's steps x the median step), and a budget run's training step (its controller reads
    every task's cost each step) against the plain TAPS step, timed in turn in one process."""
    import warnings

    from datamodules import EmbeddedDigits
    from taps_lightning.training.compose import create_taps_module
    from taps_lightning.training.settings import DEFAULT_RECALIBRATE_BATCHES

    batches = batches or DEFAULT_RECALIBRATE_BATCHES
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the module logs without a Trainer here
    data = EmbeddedDigits(num_workers=0)
    data.setup("fit")
    steps_per_epoch = max(len(data.datasets[t]["train"]) // data.batch_size for t in data.tasks)  # max_size_cycle
    tasks = data.num_classes
    modules = {}
    for name, kw in {"taps": {}, "budget": {"budget": budget}}.items():
        torch.manual_seed(0)
        module = create_taps_module(backbone="mobilenetv2_100", tasks=tasks, sparsity_warmup_epochs=0, **kw)
        module.train()
        modules[name] = (module, torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01,
                                                 momentum=0.9))
    loaders = {t: iter(torch.utils.data.DataLoader(data.datasets[t]["train"], batch_size=data.batch_size,
                                                   shuffle=True, drop_last=True)) for t in tasks}
    batch = {t: next(loader) for t, loader in loaders.items()}

    def step_of(module, optimizer):
        def step():
            loss = module.training_step(batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    names = list(modules)
    times = dict(zip(names, _interleaved([step_of(*modules[n]) for n in names], repeats, warmup)))
    taps = modules["taps"][0]

    def recalibrate():
        for task in tasks:
            loader = data.norm_dataloader(task, batches)
            tl.recalibrate_norms(taps.model, task, (x for x, _ in loader))

    recal = _interleaved([recalibrate], max(3, repeats // 5), 1)[0]
    epoch = steps_per_epoch * statistics.median(times["taps"])
    med, lo, hi = _ratio(times["budget"], times["taps"])
    return {"setup": "mobilenetv2_100, embedded digits, 4 tasks x batch 32 at 64 px, incremental TAPS",
            **provenance(), "steps_per_epoch": steps_per_epoch,
            "train_step_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
            "budget_step_ratio": med, "budget_step_ratio_spread": [lo, hi],
            "recalibrate_batches": batches, "recalibrate_s": statistics.median(recal),
            "recalibrate_epoch_ratio": statistics.median(recal) / epoch}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 8 on CPU")
    parser.add_argument("--size", type=int, default=None, help="default: 224 on GPU, 128 on CPU")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inference-repeats", type=int, default=40,
                        help="rounds for the inference ratios (a forward is short, so more rounds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true", help="measure peak memory only (no timing)")
    parser.add_argument("--process-rss", action="store_true",
                        help="also train each side alone in a fresh process and compare peak RSS (CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the operators that make the TAPS step differ from fine-tuning")
    parser.add_argument("--training-costs", action="store_true",
                        help="only: BatchNorm re-estimation time / epoch time, and budget step / TAPS step, on the "
                             "offline default set-up")
    parser.add_argument("--out", default="bench.json", help="the JSON to write (the docs' tables read docs/bench*.json)")
    args = parser.parse_args(argv)
    check_replaceable(args.out, "the benchmark JSON", "--out")  # refused now, not after minutes of measuring
    if args.training_costs:
        row = training_costs(args.repeats, args.warmup)
        print(f"{row['setup']}, {row['threads']} thread(s)\n"
              f"| re-estimation ({row['recalibrate_batches']} batches x 4 tasks) / epoch ({row['steps_per_epoch']} steps) "
              f"| budget step / TAPS step (min-max) |\n|---:|---:|\n"
              f"| {row['recalibrate_epoch_ratio']:.3f} ({row['recalibrate_s']:.2f} s) | {row['budget_step_ratio']:.3f} "
              f"({row['budget_step_ratio_spread'][0]:.3f}-{row['budget_step_ratio_spread'][1]:.3f}) |")
        _write(args.out, [row])
        return [row]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else None
    batch = args.batch or (32 if device == "cuda" else 8)
    size = args.size or (224 if device == "cuda" else 128)
    rows = [bench(a, batch, size, args.repeats, args.warmup, device, dtype, args.memory_only, args.inference_repeats)
            for a in args.archs]
    if args.process_rss:
        for row in rows:
            rss = {side: process_peak_rss(row["arch"], side, batch, size, precision)
                   for side in ("finetune", *SIDES)}
            row["process_peak_rss_bytes"] = rss
            for name in SIDES:
                row[f"process_rss_ratio_{name}"] = rss[name] / rss["finetune"]
    print(f"device={device} threads={torch.get_num_threads()} batch={batch} size={size} precision={precision}")
    print("| arch | train step TAPS/FT | (saved weight) | LoRA/FT | LoRA/TAPS | peak memory TAPS/FT | (saved weight) | "
          "LoRA/FT | LoRA/TAPS | floor: 1 + base/FT | gated infer. | merged infer. | stored bytes | count_params fraction |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def fmt(r, key):
        return f"{r[key]:.3f}" if key in r else "-"
    for r in rows:
        print(f"| {r['arch']} | {fmt(r, 'train_step_ratio_taps')} | {fmt(r, 'train_step_ratio_taps_saved_weight')} | "
              f"{fmt(r, 'train_step_ratio_lora')} | {fmt(r, 'train_step_ratio_lora_taps')} | "
              f"{fmt(r, 'memory_ratio_taps')} | {fmt(r, 'memory_ratio_taps_saved_weight')} | "
              f"{fmt(r, 'memory_ratio_lora')} | {fmt(r, 'memory_ratio_lora_taps')} | {fmt(r, 'memory_floor')} | "
              f"{fmt(r, 'gated_inference_throughput_ratio')} | {fmt(r, 'merged_inference_throughput_ratio')} | "
              f"{fmt(r, 'stored_bytes_ratio')} | {fmt(r, 'count_params_fraction')} |")
    if args.process_rss:
        print("\n| arch | process peak RSS TAPS/FT | (saved weight) | FT peak RSS MiB |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['arch']} | {fmt(r, 'process_rss_ratio_taps')} | {fmt(r, 'process_rss_ratio_taps_saved_weight')} | "
                  f"{r['process_peak_rss_bytes']['finetune'] / 2**20:.0f} |")
    if args.profile:
        for row in rows:
            ops = profile_steps(row["arch"], batch, size, device, dtype)
            row["profile_ms_per_step"] = [list(r) for r in ops[:8] + ops[-1:]]
    _write(args.out, rows)
    return rows


def _write(path: str, rows: list[dict]) -> None:
    """The rows as JSON, whole or not at all (an earlier file stays intact if this fails)."""
    text = json.dumps(rows, indent=2)
    atomic_write(path, lambda f: f.write(text), "the benchmark JSON", flag="--out", text=True)


if __name__ == "__main__":
    run_command(main)  # the error boundary: a user error is its message and exit status 2
