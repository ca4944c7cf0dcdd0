"""``python -m experiments.bench``: TAPS speed against plain fine-tuning, measured in one process.

Same model, batch, resolution, precision and thread count for both sides; warm-up excluded;
the median and min-max of several repeats. Prints a table and writes a JSON file.
Ratios: training step time and peak training memory TAPS / fine-tuning (lower is better);
inference throughput of the gated and the merged model / the plain timm model (higher is
better); bytes of one ``save_task`` file / a full model file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import timm
import torch
import torch.nn.functional as F

import taps_lightning as tl


def _once(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _paired(a, b, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` alternately (A B A B ...) so drifts in machine speed hit both."""
    for _ in range(warmup):
        a(); b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_once(a))
        tb.append(_once(b))
    return ta, tb


def _train_step(model, params, x, y, dtype):
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

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


def bench(arch: str, batch: int, size: int, repeats: int, warmup: int, device: str, dtype) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    kwargs = {"img_size": size} if arch.startswith("vit") else {}
    plain = timm.create_model(arch, num_classes=10, **kwargs).to(device)
    taps = tl.TapsModel(timm.create_model(arch, num_classes=0, **kwargs), {"t": 10}).to(device)
    res = {"arch": arch, "batch": batch, "size": size}
    tp, ft = _paired(_train_step(taps, [p for p in taps.parameters() if p.requires_grad], x, y, dtype),
                     _train_step(plain, list(plain.parameters()), x, y, dtype), repeats, warmup)
    res["train_step_ratio"] = statistics.median(a / b for a, b in zip(tp, ft))
    res["train_step_ms"] = {"taps": 1e3 * statistics.median(tp), "finetune": 1e3 * statistics.median(ft)}
    taps_step = _train_step(taps, [p for p in taps.parameters() if p.requires_grad], x, y, dtype)
    ft_step = _train_step(plain, list(plain.parameters()), x, y, dtype)
    taps_step(); ft_step()  # optimizer state exists, as in a running job
    res["peak_bytes"] = {"taps": peak_training_bytes(taps_step), "finetune": peak_training_bytes(ft_step)}
    res["memory_ratio"] = res["peak_bytes"]["taps"] / res["peak_bytes"]["finetune"]
    plain.eval(); taps.eval()
    merged = tl.merge(taps, "t").to(device).eval()
    with torch.no_grad():
        g, p = _paired(lambda: taps(x), lambda: plain(x), repeats, warmup)
        m, p2 = _paired(lambda: merged(x), lambda: plain(x), repeats, warmup)
    res["gated_inference_throughput_ratio"] = statistics.median(a / b for a, b in zip(p, g))
    res["merged_inference_throughput_ratio"] = statistics.median(a / b for a, b in zip(p2, m))
    res["spread"] = {"train_step_ratio": [min(a / b for a, b in zip(tp, ft)), max(a / b for a, b in zip(tp, ft))]}
    with tempfile.TemporaryDirectory() as tmp:
        task_file = tl.save_task(taps, "t", os.path.join(tmp, "t.safetensors"))
        full = os.path.join(tmp, "full.pt")
        torch.save(plain.state_dict(), full)
        res["stored_bytes_ratio"] = os.path.getsize(task_file) / os.path.getsize(full)
    res["count_params_fraction"] = tl.count_params(taps, "t")["fraction"]
    return res


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 8 on CPU")
    parser.add_argument("--size", type=int, default=None, help="default: 224 on GPU, 128 on CPU")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else None
    batch = args.batch or (32 if device == "cuda" else 8)
    size = args.size or (224 if device == "cuda" else 128)
    rows = [bench(a, batch, size, args.repeats, args.warmup, device, dtype) for a in args.archs]
    print(f"device={device} threads={torch.get_num_threads()} batch={batch} size={size} precision={dtype or 'fp32'}")
    print("| arch | train step TAPS/FT | peak memory TAPS/FT | gated infer. | merged infer. | stored bytes | count_params fraction |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['train_step_ratio']:.3f} | {r['memory_ratio']:.3f} | {r['gated_inference_throughput_ratio']:.3f} | "
              f"{r['merged_inference_throughput_ratio']:.3f} | {r['stored_bytes_ratio']:.3f} | {r['count_params_fraction']:.3f} |")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
