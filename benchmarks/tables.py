"""The markdown tables of the benchmark results, made from the data (`history.py`): the
latest run of each device and table in the history.

    python -m benchmarks.tables [--device NAME] [--out DIR] [--history FILE]

writes DIR/<device>_<table>.md (default DIR: benchmarks/results, e.g. h200_report.md,
h200_stages.md). `benchmarks.report` and `benchmarks.stage_times` write their own run's
table the same way (--out) and append its records to the history with --record.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import history

FLOOR = ("floor: bytes", "floor: FLOPs", "floor: launches", "floor")
STAGE_TIMES = ("ours eager", "ours graph", "reference")


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 10 else f"{r:.2f}×"


def fmt_value(value, unit: str) -> str:
    if isinstance(value, str):
        return value
    if unit == "s":
        return fmt_time(value)
    if unit == "B/s":
        return f"{value / 1e9:.0f} GB/s"
    if unit == "FLOP/s":
        return f"{value / 1e12:.3g} TFLOP/s"
    return f"{value:g} {unit}".strip()


def _fact(value, unit: str) -> str:
    """A fact of the header: short times (a launch) to 0.01 µs."""
    if unit == "s" and value < 1e-3:
        return f"{value * 1e6:.2f} µs"
    return fmt_value(value, unit)


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rows(records: list[dict]) -> dict:
    """{(row, shape, note): {column: value}}: the table's cells, in recorded order."""
    rows = {}
    for r in records:
        if r["row"] != "run":
            rows.setdefault((r["row"], r["shape"], r["note"]), {})[r["column"]] = r["value"]
    return rows


def report_body(records: list[dict]) -> list[str]:
    """prune() and its peers (a peer: its time and how many times ours), the floor terms
    and ours / floor (eager, and replayed from a CUDA graph)."""
    rows = _rows(records)
    variants = [c for c in dict.fromkeys(c for cells in rows.values() for c in cells)
                if c not in FLOOR]
    head = ["shape", "N / D / k / B", *variants, *FLOOR, "ours / floor"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for (name, sizes, _), cells in rows.items():
        ours = cells["ours"]
        out = [name, sizes]
        for c in variants:
            t = cells.get(c, "")
            out.append(fmt_value(t, "s") if isinstance(t, str) or c == "ours"
                       else f"{fmt_time(t)} ({fmt_ratio(t / ours)})")
        out += [fmt_time(cells[c]) for c in FLOOR]
        ratio = fmt_ratio(ours / cells["floor"])
        graph = cells.get("ours (CUDA graph)")
        if isinstance(graph, (int, float)):
            ratio += f" (graph {fmt_ratio(graph / cells['floor'])})"
        lines.append(md_row(out + [ratio]))
    return lines


def stages_body(records: list[dict]) -> list[str]:
    """Per stage: ours eagerly and replayed from a CUDA graph, the reference, in µs."""
    head = ["stage", "shape", *(f"{c} µs" for c in STAGE_TIMES), "ref / ours(graph)", "note"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for (stage, shape, note), cells in _rows(records).items():
        us = [f"{cells[c] * 1e6:.1f}" if c in cells else "" for c in STAGE_TIMES]
        ratio = (f"{cells['reference'] / cells['ours graph']:.0f}x"
                 if "reference" in cells and "ours graph" in cells else "")
        lines.append(md_row([stage, shape, *us, ratio, note]))
    return lines


def _variant(label: str) -> tuple[str, str]:
    """"D2Pruner k=64" -> ("D2Pruner", "64"); "unpruned" -> ("unpruned", "")."""
    kind, _, k = label.partition(" k=")
    return kind, k


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def e2e_body(records: list[dict]) -> list[str]:
    """benchmarks.e2e: per model, batch and k, TTFT and decode time per token unpruned,
    with D2Pruner and with the top-k of raw attention (× = unpruned / that time), the
    pruner's share of the pruned prefill, the KV cache per request."""
    rows = _rows(records)
    head = ["model", "B", "k", "TTFT unpruned", "TTFT D2Pruner", "TTFT top-k attn",
            "decode/token unpruned", "decode D2Pruner", "decode top-k attn",
            "pruner share of TTFT (D2Pruner / top-k)", "KV MiB/request (unpruned → pruned)"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    groups: dict = {}
    for (model, batch, note), cells in rows.items():
        if note != "model":
            kind, k = _variant(note)
            groups.setdefault((model, batch), {})[kind, k] = cells
    for (model, batch), cells in groups.items():
        base = cells.get(("unpruned", ""))
        for k in dict.fromkeys(k for _, k in cells if k):
            ours, topk = cells.get(("D2Pruner", k), {}), cells.get(("top-k attn", k), {})

            def timed(c, column):
                if column not in c:
                    return ""
                t = c[column]
                return f"{fmt_time(t)} ({base[column] / t:.2f}×)" if base else fmt_time(t)
            share = " / ".join(f"{100 * c['pruner share']:.2f}%" if "pruner share" in c
                               else "" for c in (ours, topk))
            kv = (f"{_mib(base['KV / request'])} → {_mib(ours['KV / request'])}"
                  if base and "KV / request" in ours else "")
            lines.append(md_row([model, batch.removeprefix("B="), k,
                                 fmt_time(base["TTFT"]) if base else "",
                                 timed(ours, "TTFT"), timed(topk, "TTFT"),
                                 fmt_time(base["decode / token"]) if base else "",
                                 timed(ours, "decode / token"), timed(topk, "decode / token"),
                                 share, kv]))
    models = {model: cells for (model, _, note), cells in rows.items() if note == "model"}
    if models:
        lines += [""] + [f"- {model}: {c['parameters'] / 1e6:.1f}M parameters "
                         f"({c['vision parameters'] / 1e6:.1f}M in the vision tower)"
                         for model, c in models.items()]
    return lines


TABLES = {"report": ("prune() against its peers and the hardware floor", report_body),
          "e2e": ("end to end: time to first token, decode time per token and KV cache, "
                  "unpruned and pruned (benchmarks.e2e)", e2e_body),
          "stages": ("per-stage GPU timings", stages_body),
          "varlen": ("prune_varlen against dense prune() and a loop of prune(); odd D "
                     "(benchmarks.varlen_ab)", stages_body)}


def markdown(run: list[dict], generated_by: str | None = None) -> str:
    """The table of one run's records, under a header of what the run shares and its facts."""
    first = run[0]
    title, body = TABLES[first["table"]]
    lines = [f"<!-- generated by {generated_by}: do not edit by hand -->"] if generated_by else []
    lines += [f"# d2pruner_kernels: {title}", "",
              f"- device: {first['device']}",
              f"- torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}",
              f"- date: {first['date']}, commit {first['commit']}",
              f"- command: `{first['command']}`"]
    lines += [f"- {r['column']}: {_fact(r['value'], r['unit'])}"
              + (f" ({r['note']})" if r["note"] else "") for r in run if r["row"] == "run"]
    return "\n".join(lines + ["", *body(run)]) + "\n"


def slug(device: str) -> str:
    """A file name's start: "NVIDIA H200" -> "h200"."""
    return re.sub(r"[^a-z0-9]+", "_", device.lower().removeprefix("nvidia ")).strip("_")


# --- the command lines ----------------------------------------------------------------------

def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--out and --record, for the scripts that measure a table."""
    parser.add_argument("--out", help="write this run's markdown table here (default: stdout)")
    parser.add_argument("--record", nargs="?", const=str(history.HISTORY), metavar="FILE",
                        help="append this run's measurements to FILE (default: "
                        "benchmarks/results/history.jsonl); CI smoke runs leave it off")


def finish(rec: history.Recorder, args: argparse.Namespace) -> None:
    """The run's table to --out (or stdout), its records to --record."""
    text = markdown(rec.records)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.record:
        history.append(rec.records, args.record)
        print(f"recorded {len(rec.records)} measurements in {args.record}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="only this device, as recorded (e.g. 'NVIDIA H200')")
    parser.add_argument("--out", default=str(history.HISTORY.parent),
                        help="folder of the tables (default: benchmarks/results)")
    parser.add_argument("--history", default=str(history.HISTORY), help="the data")
    args = parser.parse_args(argv)
    runs = history.latest_runs(history.load(args.history), args.device)
    if not runs:
        print(f"no runs{f' of {args.device}' if args.device else ''} in {args.history}",
              file=sys.stderr)
        return 1
    source = Path(args.history).resolve()
    shown = source.relative_to(history.REPO) if source.is_relative_to(history.REPO) else source
    for run in runs:
        path = Path(args.out) / f"{slug(run[0]['device'])}_{run[0]['table']}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(run, f"`python -m benchmarks.tables` from {shown}"),
                        encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
