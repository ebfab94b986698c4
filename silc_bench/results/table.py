"""Tables laid out like the paper's: the paper's own rows, then rows measured by this run."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from silc_bench.paths import PAPER_DIR


def read_paper_table(csv_name: str) -> tuple[list[str], list[dict]]:
    with open(PAPER_DIR / csv_name, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def model_label(record: dict) -> str:
    model = record["model"]
    label = model.get("registry_name") or model.get("spec") or "model"
    if record["dataset"].get("limited"):
        label += " (limited)"
    return label


def _fmt(value) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.1f}"


def paper_layout_table(task_spec: dict, records: list[dict], metric: str | None = None, paper_rows: bool = True) -> str:
    """Markdown: one column per dataset of the paper's table (plus any extra dataset measured),
    the paper's rows first, then one row per measured model."""
    metric = metric or task_spec["metric"]["primary"]
    paper = task_spec.get("paper") or {}
    columns, rows = [], []
    if paper.get("csv"):
        fields, rows = read_paper_table(paper["csv"])
        key = paper.get("row_key", fields[0])
        columns = [c for c in fields if c != key]
    measured: dict[str, dict[str, float]] = {}
    for r in records:
        ds = r["dataset"]["name"]
        if ds not in columns:
            columns.append(ds)
        measured.setdefault(model_label(r), {})[ds] = r["metrics"].get(metric)
    header = ["model", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if paper_rows:
        for row in rows:
            lines.append("| " + " | ".join([f"{row[key]} (paper)", *(_fmt(row.get(c)) for c in columns)]) + " |")
    for label, values in measured.items():
        lines.append("| " + " | ".join([f"**{label}**", *(_fmt(values.get(c)) for c in columns)]) + " |")
    title = f"Table {paper['table']}" if paper.get("table") else task_spec["name"]
    return f"{title} layout: {task_spec.get('description', task_spec['name'])}, {metric} (%)\n\n" + "\n".join(lines) + "\n"
