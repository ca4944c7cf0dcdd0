"""``python -m experiments.bench``: TAPS speed against plain fine-tuning, measured in one process.

Same model, batch, resolution, precision and thread count for both sides; warm-up excluded;
the median and min-max of several repeats. Prints a table and writes a JSON file.
Work in progress (issue "Benchmarks"): peak memory is measured on CUDA only so far.
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
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


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
    print("| arch | train step TAPS/FT | gated infer. | merged infer. | stored bytes | count_params fraction |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['train_step_ratio']:.3f} | {r['gated_inference_throughput_ratio']:.3f} | "
              f"{r['merged_inference_throughput_ratio']:.3f} | {r['stored_bytes_ratio']:.3f} | {r['count_params_fraction']:.3f} |")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
