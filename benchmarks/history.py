"""Results as data: every measurement of a run, one JSON object a line, appended to
`results/history.jsonl` (by `--record`); `benchmarks.tables` makes the markdown from it.

A record: what its run shares (date, commit, device, torch, triton, cuda, command, table),
then row and shape (the row of the table: a shape name and its sizes, or a stage and its
shape; row "run" holds the run's facts: measured bandwidth, sync check, ...), column (a
variant, a timing, a floor term), value (a number in `unit`, or a text such as
"skipped (too slow)") and note. A run is the records sharing date, commit, command,
device and table.
"""
from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from .harness import device_name

REPO = Path(__file__).resolve().parents[1]
HISTORY = REPO / "benchmarks" / "results" / "history.jsonl"
RUN_KEY = ("date", "commit", "command", "device", "table")


def commit() -> str:
    """HEAD's short hash, "+dirty" when the tree differs (the results folder aside)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def command(module: str, argv: list[str] | None) -> str:
    """How the run was started, e.g. `python -m benchmarks.report --quick`."""
    args = sys.argv[1:] if argv is None else argv
    return f"python -m {module} {shlex.join(args)}".strip()


class Recorder:
    """The records of one run of one table."""

    def __init__(self, table: str, command: str):
        import triton
        self.fields = dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit(),
            device=device_name(), torch=torch.__version__, triton=triton.__version__,
            cuda=torch.version.cuda or "none", command=command, table=table)
        self.records: list[dict] = []

    def add(self, row: str, shape: str, column: str, value, unit: str = "s", note: str = ""):
        self.records.append(dict(self.fields, row=row, shape=shape, column=column,
                                 value=value, unit="" if isinstance(value, str) else unit,
                                 note=note))

    def fact(self, column: str, value, unit: str = "", note: str = ""):
        """A fact of the whole run (the table's header)."""
        self.add("run", "", column, value, unit, note)


def append(records: list[dict], path=HISTORY) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def load(path=HISTORY) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_runs(records: list[dict], device: str | None = None) -> list[list[dict]]:
    """The last run of each (device, table) in the history, in order of first appearance."""
    last = {}
    for r in records:
        if device is None or r["device"] == device:
            last[r["device"], r["table"]] = tuple(r[k] for k in RUN_KEY)
    return [[r for r in records if tuple(r[k] for k in RUN_KEY) == key]
            for key in last.values()]
