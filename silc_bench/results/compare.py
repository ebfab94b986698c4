"""`silc-bench compare`: the regression gate. Current records against a baseline, metric by metric.

A baseline is a leaderboard CSV (`silc-bench export leaderboard`, or `--write-baseline`) or a JSON
list of {model, task, dataset, metric, value, tolerance?}. Tolerances are absolute, in metric
points; a row's own `tolerance` overrides `--tolerance`. A baseline row with no current record
fails as MISSING: a gate that silently skips what it cannot find would pass on an empty run.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from silc_bench.errors import UserError
from silc_bench.results.leaderboard import COLUMNS, KEY, metric_rows, to_csv
from silc_bench.results.record import atomic_write_text
from silc_bench.results.report import load_records

DEFAULT_TOLERANCE = 0.5
_SLACK = 1e-9  # 19.1 -> 19.6 is a move of 0.5000000000000036 in floating point; that is 0.5


@dataclass
class Check:
    key: tuple[str, str, str, str]  # model, task, dataset, metric
    baseline: float
    current: float | None
    tolerance: float
    where: str  # the baseline row, for messages
    higher_is_better: bool = True
    allow_better: bool = False

    @property
    def delta(self) -> float | None:
        return None if self.current is None else self.current - self.baseline

    @property
    def status(self) -> str:
        if self.current is None:
            return "MISSING"
        if math.isnan(self.baseline) or math.isnan(self.current):
            return "ok" if math.isnan(self.baseline) and math.isnan(self.current) else "MOVED"
        if abs(self.delta) <= self.tolerance + _SLACK:
            return "ok"
        better = (self.delta > 0) == self.higher_is_better
        if better:
            return "ok" if self.allow_better else "BETTER"
        return "WORSE"


# ---------------------------------------------------------------- baseline files

def _number(value, what: str, path: Path, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {what} {value!r} is not a number", path=path,
                        fix=f"give {what} as a number in metric points (e.g. 19.3)")


def read_baseline(path: str | Path) -> list[dict]:
    """Rows {model, task, dataset, metric, value, tolerance (None = the global one), where}.

    The format is read from the content: a JSON list, else a CSV with a header row.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"baseline is unreadable ({e})", path=path,
                        fix="pass an existing file, or create one with `silc-bench compare --records DIR --write-baseline FILE`")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"baseline is not valid JSON ({e})", path=path, fix="correct the JSON syntax")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError("a JSON baseline must be a list of objects", path=path,
                            fix='write [{"model": ..., "task": ..., "dataset": ..., "metric": ..., "value": ...}, ...]')
        raw = [(f"entry {i}", r) for i, r in enumerate(data)]
    else:
        reader = csv.DictReader(io.StringIO(text))
        absent = [c for c in (*KEY, "value") if c not in (reader.fieldnames or [])]
        if absent:
            raise UserError(f"baseline CSV lacks the columns {absent}", path=path,
                            fix="use the leaderboard format (silc-bench export leaderboard) or a JSON list")
        raw = [(f"line {i}", r) for i, r in enumerate(reader, 2)]
    rows, seen = [], {}
    for where, r in raw:
        key = tuple(str(r.get(k) or "").strip() for k in KEY)
        if not all(key):
            raise UserError(f"{where}: model, task, dataset and metric must all be given", path=path,
                            fix="fill the row's key fields or delete the row")
        if key in seen:
            raise UserError(f"{where}: {' / '.join(key)} is also given at {seen[key]}", path=path,
                            fix="keep one row per (model, task, dataset, metric)")
        seen[key] = where
        tolerance = r.get("tolerance")
        if tolerance is not None and str(tolerance).strip() != "":
            tolerance = _number(tolerance, "tolerance", path, where)
            if tolerance < 0:
                raise UserError(f"{where}: tolerance {tolerance} is negative", path=path, fix="give an absolute tolerance >= 0")
        else:
            tolerance = None
        rows.append({"key": key, "value": _number(r.get("value"), "value", path, where), "tolerance": tolerance,
                     "where": where})
    return rows


def write_baseline(path: str | Path, rows: list[dict]) -> None:
    """Leaderboard CSV plus an empty `tolerance` column to fill per row; a JSON list for *.json."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = [{**{c: r[c] for c in COLUMNS}, "value": r["value"] if not math.isnan(r["value"]) else "nan"} for r in rows]
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    else:
        atomic_write_text(path, to_csv([{**r, "tolerance": None} for r in rows], columns=(*COLUMNS, "tolerance")))


# ---------------------------------------------------------------- comparison

def compare(baseline: list[dict], current: list[dict], tolerance: float = DEFAULT_TOLERANCE,
            allow_better: bool = False) -> list[Check]:
    """One Check per baseline row; `current` is `leaderboard.metric_rows(...)`. A move beyond
    tolerance is WORSE or BETTER by the metric's direction (`higher_is_better` of its task spec);
    both fail unless `allow_better` lets improvements pass."""
    now = {tuple(r[k] for k in KEY): r for r in current}
    checks = []
    for b in baseline:
        row = now.get(b["key"])
        direction = row["higher_is_better"] if row is not None else b.get("higher_is_better", True)
        checks.append(Check(b["key"], b["value"], None if row is None else row["value"],
                            tolerance if b["tolerance"] is None else b["tolerance"], b["where"],
                            higher_is_better=bool(direction), allow_better=allow_better))
    return checks


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def failure_report(failed: list[Check], total: int, baseline_path) -> str:
    header = ["status", "model", "task", "dataset", "metric", "baseline", "current", "delta", "tolerance", "baseline row"]
    body = [[c.status, *c.key, _num(c.baseline), _num(c.current) if c.current is not None else "(no record)",
             _num(c.delta, signed=True), _num(c.tolerance), c.where] for c in failed]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [f"compare: {len(failed)} of {total} metrics failed against {baseline_path} "
             f"(WORSE / BETTER: beyond tolerance, by the metric's direction; MISSING: no current record)"]
    lines += ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines)


# ---------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", metavar="FILE", help="baseline: leaderboard CSV or JSON list of {model, task, dataset, metric, value, tolerance?}")
    which.add_argument("--write-baseline", metavar="FILE", help="(re)create FILE from the current records instead of comparing (.json: JSON, else CSV)")
    parser.add_argument("--records", action="append", required=True, metavar="DIR",
                        help="folder (searched recursively) or file of current result records; repeatable")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"allowed absolute move in metric points (default {DEFAULT_TOLERANCE}); a baseline row's own tolerance wins")
    parser.add_argument("--allow-better", action="store_true",
                        help="let moves in the metric's good direction (higher_is_better of its task) pass")
    parser.add_argument("--metric", action="extend", nargs="+", metavar="NAME",
                        help="only these metrics (e.g. --metric mIoU aAcc); default all in the baseline")


def main(args: argparse.Namespace) -> int:
    if args.tolerance < 0 or math.isnan(args.tolerance):
        raise UserError(f"--tolerance must be >= 0, got {args.tolerance}", fix="give an absolute tolerance in metric points")
    metrics = set(args.metric or [])
    current = metric_rows(load_records(args.records))
    if args.write_baseline:
        rows = [r for r in current if not metrics or r["metric"] in metrics]
        if not rows:
            raise UserError("no current metrics to write" + (f" for {sorted(metrics)}" if metrics else ""),
                            path=", ".join(map(str, args.records)), fix="check --records and --metric")
        write_baseline(args.write_baseline, rows)
        print(f"compare: wrote baseline {args.write_baseline} with {len(rows)} metrics")
        return 0
    baseline = [b for b in read_baseline(args.baseline) if not metrics or b["key"][3] in metrics]
    if not baseline:
        raise UserError("baseline has no rows to check" + (f" for metrics {sorted(metrics)}" if metrics else ""),
                        path=args.baseline, fix="check --metric, or write a baseline with --write-baseline")
    checks = compare(baseline, current, args.tolerance, allow_better=args.allow_better)
    failed = [c for c in checks if c.status != "ok"]
    if failed:
        print(failure_report(failed, len(checks), args.baseline))
        return 1
    print(f"compare: {len(checks)} metrics within tolerance")
    return 0
