"""`silc-bench export leaderboard`: one CSV row per (model, task, dataset, metric), with provenance.

Each row says what produced its number (checkpoint and tokenizer hashes, task version, protocol
hash, git commit, versions, device, date), so a leaderboard entry can be traced and reproduced.
The same rows are the baseline format of `silc-bench compare`.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

from silc_bench.errors import UserError
from silc_bench.results.record import atomic_write_text
from silc_bench.results.report import DEFAULT_RECORDS, load_records, model_label, newest_first

COLUMNS = (
    "model", "model_spec", "checkpoint_sha256", "tokenizer_kind", "tokenizer_sha256",
    "task", "task_version", "dataset", "limited", "limit", "num_images", "metric", "value", "higher_is_better",
    "protocol_sha256", "git_commit", "git_dirty", "silc_bench_version", "torch_version", "device", "created",
)
KEY = ("model", "task", "dataset", "metric")


def scalar_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Headline numbers, nested dicts flattened to dotted names; lists (per-class values) are skipped."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            out.update(scalar_metrics(value, f"{prefix}{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{name}"] = float(value)
    return out


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_value(value: float) -> str:
    """Full precision (shortest round-trip repr) so compare sees the number that was measured."""
    return "nan" if math.isnan(value) else repr(float(value))


def metric_rows(records: list[dict]) -> list[dict]:
    """One row per (model label, task, dataset, metric); the newest record wins; sorted by that key.

    `value` stays a float here; `to_csv` formats it.
    """
    newest: dict[tuple, dict] = {}
    for record in newest_first(records):
        label = model_label(record)
        for metric, value in scalar_metrics(record["metrics"]).items():
            key = (label, record["task"]["name"], record["dataset"]["name"], metric)
            if key not in newest:
                newest[key] = _row(record, label, metric, value)
    return [newest[k] for k in sorted(newest)]


def _row(record: dict, label: str, metric: str, value: float) -> dict:
    model, dataset, task = record["model"], record["dataset"], record["task"]
    tokenizer = model.get("tokenizer") if isinstance(model.get("tokenizer"), dict) else {}
    env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    git = env.get("git") if isinstance(env.get("git"), dict) else {}
    versions = env.get("versions") if isinstance(env.get("versions"), dict) else {}
    return {
        "model": label,
        "model_spec": model.get("spec"),
        "checkpoint_sha256": model.get("sha256"),
        "tokenizer_kind": tokenizer.get("kind"),
        "tokenizer_sha256": tokenizer.get("sha256") or tokenizer.get("vocab_sha256"),  # open_clip: vocab hash
        "task": task["name"],
        "task_version": task.get("version"),
        "dataset": dataset["name"],
        "limited": bool(dataset.get("limited")),
        "limit": dataset.get("limit"),
        "num_images": dataset.get("num_images"),
        "metric": metric,
        "value": value,
        "higher_is_better": metric_direction(record, metric),
        "protocol_sha256": record.get("protocol_sha256"),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "silc_bench_version": versions.get("silc-bench"),
        "torch_version": versions.get("torch"),
        "device": env.get("device"),
        "created": record.get("created"),
    }


def metric_direction(record: dict, metric: str) -> bool:
    """Whether a larger `metric` is better: the record's own `metric` block (its task spec's), else
    the task spec as registered now, else True (every metric silc-bench reports so far)."""
    from silc_bench.harness.base import higher_is_better

    block = record.get("metric")
    if not isinstance(block, dict):
        from silc_bench import registry

        block = (registry.tasks().get(record["task"]["name"]) or {}).get("metric") or {}
    return higher_is_better(block, metric)


def to_csv(rows: list[dict], columns=COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row[c]) if c == "value" else _text(row.get(c)) for c in columns])
    return buf.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", action="append", metavar="DIR",
                        help=f"folder (searched recursively) or file of result records; repeatable (default {DEFAULT_RECORDS})")
    parser.add_argument("--out", required=True, metavar="FILE.csv", help="leaderboard CSV to write")


def main(args: argparse.Namespace) -> int:
    dirs = args.records or [DEFAULT_RECORDS]
    rows = metric_rows(load_records(dirs))
    if not rows:
        raise UserError("no result records with metrics found", path=", ".join(map(str, dirs)),
                        fix="run `silc-bench run TASK --model M` first, or pass --records DIR")
    atomic_write_text(Path(args.out), to_csv(rows))
    models = len({r["model"] for r in rows})
    print(f"wrote {args.out}: {len(rows)} rows ({models} models)")
    return 0
