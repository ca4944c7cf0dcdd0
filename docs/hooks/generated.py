"""MkDocs hook: the benchmark tables are drawn from the JSON that ``experiments.bench`` writes.

A page line ``<!-- bench:NAME -->`` is replaced by a table made from ``docs/<file>.json`` at build
time, so a benchmark figure has one source (the JSON) and no page copies it by hand. The table
says the thread count recorded in the JSON, and the machine and commit where the JSON records them
(a JSON written before ``experiments.bench`` recorded them: the table then says so).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

DOCS = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^([ \t]*)<!-- bench:(\w+) -->[ \t]*$", re.M)


def _f(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _setup(rows: Iterable[dict], suffix: str = "") -> str:
    """The batch, resolution and precision the rows were measured at."""
    return ", ".join(sorted({f"batch {r['batch']} at {r['size']} px, {r['precision']}{suffix}" for r in rows}))


def _provenance(rows: list[dict], source: str) -> str:
    threads = sorted({str(r.get("threads")) for r in rows})
    machine = sorted({str(r["machine"]) for r in rows if r.get("machine")}) or ["machine not recorded in the JSON"]
    commit = sorted({str(r["commit"]) for r in rows if r.get("commit")}) or ["commit not recorded in the JSON"]
    return (f"*Source: `docs/{source}` ({', '.join(machine)}; {'/'.join(threads)} thread(s); "
            f"{', '.join(commit)}).*")


def _cpu_table() -> str:
    rows = json.loads((DOCS / "bench.json").read_text())
    out = ["| backbone | train step TAPS / FT | peak train memory TAPS / FT | floor: 1 + base weights / FT peak "
           "| process peak RSS TAPS / FT | gated inference / plain | merged inference / plain | task file / full model file |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['arch']} | {_f(r.get('train_step_ratio_taps'))} | {_f(r.get('memory_ratio_taps'))} | "
                   f"{_f(r.get('memory_floor'))} | {_f(r.get('process_rss_ratio_taps'))} | "
                   f"{_f(r.get('gated_inference_throughput_ratio'))} | {_f(r.get('merged_inference_throughput_ratio'))} | "
                   f"{_f(r.get('stored_bytes_ratio'))} |")
    for r in rows:
        out.append(f"| {r['arch']}, `recompute_weight=False` | {_f(r.get('train_step_ratio_taps_saved_weight'))} | "
                   f"{_f(r.get('memory_ratio_taps_saved_weight'))} | | {_f(r.get('process_rss_ratio_taps_saved_weight'))} | | | |")
    return f"{_setup(rows)}:\n\n" + "\n".join(out) + "\n\n" + _provenance(rows, "bench.json")


def _spread_table() -> str:
    rows = json.loads((DOCS / "bench.json").read_text())
    out = ["| backbone | step TAPS / FT (min-max over rounds) | with `recompute_weight=False` |", "|---|---:|---:|"]
    for r in rows:
        s = r.get("spread", {})
        a, b = s.get("train_step_ratio_taps", [None, None]), s.get("train_step_ratio_taps_saved_weight", [None, None])
        out.append(f"| {r['arch']} | {_f(a[0])}-{_f(a[1])} | {_f(b[0])}-{_f(b[1])} |")
    return "\n".join(out)


def _profile_table() -> str:
    rows = [r for r in json.loads((DOCS / "bench.json").read_text()) if r.get("profile_ms_per_step")]
    r = rows[0]
    out = [f"{r['arch']}, self CPU ms per step, the operators only TAPS runs:", "",
           "| op | fine-tuning | TAPS |", "|---|---:|---:|"]
    for name, ft, taps in r["profile_ms_per_step"]:
        if ft == 0 and taps > 0:
            out.append(f"| `{name}` | {ft:.1f} | {taps:.1f} |")
    return "\n".join(out)


def _lora_table() -> str:
    rows = json.loads((DOCS / "bench.json").read_text())
    out = ["| backbone | train step LoRA / FT | train step LoRA / TAPS (min-max over rounds) | peak train memory LoRA / FT "
           "| peak train memory LoRA / TAPS | process peak RSS LoRA / FT |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r.get("spread", {}).get("train_step_ratio_lora_taps", [None, None])
        out.append(f"| {r['arch']} | {_f(r.get('train_step_ratio_lora'))} | {_f(r.get('train_step_ratio_lora_taps'))} "
                   f"({_f(lo)}-{_f(hi)}) | {_f(r.get('memory_ratio_lora'))} | {_f(r.get('memory_ratio_lora_taps'))} | "
                   f"{_f(r.get('process_rss_ratio_lora'))} |")
    return "\n".join(out) + "\n\n" + _provenance(rows, "bench.json")


def _bf16_table() -> str:
    rows = json.loads((DOCS / "bench_bf16_b32_224.json").read_text())
    out = ["| backbone | peak train memory TAPS / FT | with `recompute_weight=False` | floor: 1 + base weights / FT peak |",
           "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['arch']} | {_f(r.get('memory_ratio_taps'))} | {_f(r.get('memory_ratio_taps_saved_weight'))} | "
                   f"{_f(r.get('memory_floor'))} |")
    return f"{_setup(rows, ' autocast')}:\n\n" + "\n".join(out) + "\n\n" + _provenance(rows, "bench_bf16_b32_224.json")


def _costs_table() -> str:
    rows = json.loads((DOCS / "bench_training_costs.json").read_text())
    out = ["| set-up | re-estimation before a validation / one training epoch | re-estimation (s) "
           "| budget-mode step / plain TAPS step (min-max) |", "|---|---:|---:|---:|"]
    for r in rows:
        lo, hi = r.get("budget_step_ratio_spread", [None, None])
        out.append(f"| {r['setup']}, {r['recalibrate_batches']} batches, {r['steps_per_epoch']} steps per epoch | "
                   f"{_f(r.get('recalibrate_epoch_ratio'))} | {_f(r.get('recalibrate_s'), 1)} | "
                   f"{_f(r.get('budget_step_ratio'))} ({_f(lo)}-{_f(hi)}) |")
    return "\n".join(out) + "\n\n" + _provenance(rows, "bench_training_costs.json")


#: The performance targets (the results issue): (what, JSON file, key, bound, "<=" or ">=").
TARGETS = [("training step TAPS / FT", "bench.json", "train_step_ratio_taps", 1.03, "<="),
           ("peak training memory TAPS / FT", "bench.json", "memory_ratio_taps", 1.05, "<="),
           ("peak training memory TAPS / FT", "bench_bf16_b32_224.json", "memory_ratio_taps", 1.05, "<="),
           ("merged inference / plain", "bench.json", "merged_inference_throughput_ratio", 0.98, ">="),
           ("gated inference / plain", "bench.json", "gated_inference_throughput_ratio", 0.97, ">=")]


def _targets_table() -> str:
    """Each performance target against each backbone's measured ratio: met or missed, and by how much."""
    files = {name: {r["arch"]: r for r in json.loads((DOCS / name).read_text())}  # each file read once
             for name in dict.fromkeys(name for _, name, *_ in TARGETS)}
    arches = list(files["bench.json"])
    out = ["| target | " + " | ".join(arches) + " |", "|---|" + "---|" * len(arches)]
    for what, name, key, bound, sense in TARGETS:
        cells = []
        for arch in arches:
            value = files[name].get(arch, {}).get(key)
            if value is None:
                cells.append("not measured")
                continue
            met = value <= bound if sense == "<=" else value >= bound
            cells.append(f"{value:.3f}: **{'met' if met else 'missed'}**" + ("" if met else f" by {abs(value - bound):.3f}"))
        out.append(f"| {what} {sense} {bound} ({_setup(files[name].values())}) | " + " | ".join(cells) + " |")
    sources = [_provenance(list(rows.values()), name) for name, rows in files.items()]
    return "\n".join(out) + "\n\n" + "\n\n".join(sources)


TABLES = {"targets": _targets_table, "cpu": _cpu_table, "spread": _spread_table, "profile": _profile_table, "lora": _lora_table, "bf16": _bf16_table,
          "costs": _costs_table}


def render(markdown: str) -> str:
    """``markdown`` with every ``<!-- bench:NAME -->`` line replaced by its table."""
    def table(m: re.Match) -> str:
        indent, name = m.groups()
        if name not in TABLES:
            raise ValueError(f"unknown benchmark table {name!r}; known: {sorted(TABLES)}")
        return "\n".join(indent + line if line else line for line in TABLES[name]().splitlines())
    return MARK.sub(table, markdown)


def on_page_markdown(markdown, page, config, files):  # MkDocs hook
    return render(markdown)


#: A Sphinx cross-reference role as the docstrings write them (``:class:`~x.Y```), once
#: mkdocstrings has rendered it: the role's name left in front of the code span.
_SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(?=<code)")


def on_page_content(html, page, config, files):  # MkDocs hook
    """Drop the Sphinx role names the docstrings use (the API pages show the code span alone)."""
    return _SPHINX_ROLE.sub("", html)
