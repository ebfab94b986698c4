"""`silc-bench report`: result records -> the SILC paper's Tables 1-6, in the paper's layout.

Which (task, dataset, metric) fills which column is data (configs/paper_tables.yaml). Each table
shows the paper's reference rows, then one row per measured model. When several records give the
same cell, the newest (by `created`) wins and a footnote says so, naming the records.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from silc_bench.errors import UserError
from silc_bench.paths import CONFIGS_DIR, PAPER_DIR
from silc_bench.results.record import atomic_write_text, read_record

TABLES_CONFIG = CONFIGS_DIR / "paper_tables.yaml"
DEFAULT_RECORDS = Path("results/runs")  # under the current folder, where `silc-bench run` writes by default
FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}
_EPOCH = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


# ---------------------------------------------------------------- records

def warn(message: str) -> None:
    print(f"silc-bench: warning: {message}", file=sys.stderr)


def _record_problem(record: dict) -> str | None:
    """What makes a schema-valid record unusable for tables (None if it is usable)."""
    if not isinstance(record.get("task"), dict) or not isinstance(record["task"].get("name"), str):
        return "task.name is missing"
    if not isinstance(record.get("model"), dict):
        return "model is not a mapping"
    if not isinstance(record.get("dataset"), dict) or not isinstance(record["dataset"].get("name"), str):
        return "dataset.name is missing"
    if not isinstance(record.get("metrics"), dict):
        return "metrics is not a mapping"
    return None


def load_records(dirs, *, on_skip=warn) -> list[dict]:
    """Every usable record under `dirs` (folders searched recursively, or single files).

    Invalid files are skipped with a warning naming them; work folders (hidden, shards, cache)
    are not searched. Each record gets `_path` and `_relpath` (relative to the folder given).
    """
    out, seen = [], set()
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise UserError("records folder does not exist", path=root,
                            fix="pass --records DIR holding result records (written by `silc-bench run --out DIR`)")
        if root.is_file():
            paths, base = [root], root.parent
        else:
            paths, base = sorted(root.rglob("*.json")), root
            paths = [p for p in paths if not any(part.startswith(".") or part in ("shards", "cache")
                                                 for part in p.relative_to(root).parts)]
        for path in paths:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                record = read_record(path)
            except UserError as e:  # its first line says why (unreadable JSON, wrong schema, ...)
                on_skip(f"skipping {path}: {str(e).splitlines()[0]}")
                continue
            problem = _record_problem(record)
            if problem:
                on_skip(f"skipping {path}: {problem}")
                continue
            record["_path"] = str(path)
            record["_relpath"] = path.relative_to(base).as_posix()
            out.append(record)
    return out


def model_label(record: dict) -> str:
    """Registry name, else the spec as given; " (limited)" for runs on the first N images only."""
    model = record.get("model") or {}
    label = model.get("registry_name") or model.get("spec") or "model"
    if (record.get("dataset") or {}).get("limited"):
        label += " (limited)"
    precision = record.get("precision") or {}
    mode = precision.get("mode", "fp32")
    if mode != "fp32":  # a bf16 / fp16 row is its own row, never the fp32 one
        label += f" ({mode})"
    if precision.get("compiled"):  # so is a compiled run's
        label += " (compiled)"
    return label


def label_sort_key(record: dict) -> tuple:
    model = record.get("model") or {}
    return (str(model.get("registry_name") or model.get("spec") or "model"), bool(record["dataset"].get("limited")))


def created_at(record: dict) -> _dt.datetime:
    try:
        when = _dt.datetime.fromisoformat(str(record.get("created")))
    except ValueError:
        return _EPOCH
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def newest_first(records: list[dict]) -> list[dict]:
    """Newest by `created` first; ties broken by path so the choice is deterministic."""
    return sorted(records, key=lambda r: (created_at(r), r.get("_path", "")), reverse=True)


def metric_value(metrics: dict, name: str) -> float | None:
    """A scalar metric by name (a dotted path reaches into nested dicts); None if absent or not a number."""
    value = metrics.get(name) if name in metrics else None
    if name not in metrics and "." in name:
        value = metrics
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# ---------------------------------------------------------------- config

def load_tables_config(path: str | Path = TABLES_CONFIG) -> dict[int, dict]:
    """configs/paper_tables.yaml, checked: every paper column is mapped to (task, dataset, metric)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"paper tables config is unreadable ({e})", path=path, fix="run from a source checkout")
    except yaml.YAMLError as e:
        raise UserError(f"paper tables config is not valid YAML: {e}", path=path, fix="correct the YAML syntax")
    tables = (data or {}).get("tables") if isinstance(data, dict) else None
    if not isinstance(tables, dict) or not tables:
        raise UserError("paper tables config has no `tables` mapping", path=path, fix="write `tables: {1: {...}, ...}`")
    out = {}
    for number, spec in tables.items():
        where = f"table {number}"
        if not isinstance(spec, dict) or not all(k in spec for k in ("csv", "row_key", "columns")):
            raise UserError(f"{where} needs csv, row_key and columns", path=path, fix="see the comment at the top of the file")
        keys = [spec["row_key"]] if isinstance(spec["row_key"], str) else list(spec["row_key"])
        columns = {}
        for column, source in spec["columns"].items():
            if not isinstance(source, dict) or not all(isinstance(source.get(k), str) for k in ("task", "dataset", "metric")):
                raise UserError(f"{where} column {column!r} needs task, dataset and metric", path=path,
                                fix=f"write `{column}: {{task: ..., dataset: ..., metric: ...}}`")
            columns[str(column)] = (source["task"], source["dataset"], source["metric"])
        extra = []
        for rule in spec.get("extra") or []:
            if not isinstance(rule, dict) or not all(isinstance(rule.get(k), str) for k in ("task", "metric", "column")):
                raise UserError(f"{where}: each `extra` entry needs task, metric and column", path=path,
                                fix='write `- {task: zs-seg, metric: mIoU, column: "{dataset}"}`')
            extra.append(rule)
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise UserError(f"table number {number!r} is not an integer", path=path, fix="key tables by 1, 2, ...")
        out[number] = {"csv": spec["csv"], "title": spec.get("title", ""), "row_key": keys, "columns": columns,
                       "extra": extra, "measured_keys": dict(spec.get("measured_keys") or {}), "_config": str(path)}
    return dict(sorted(out.items()))


def read_paper_csv(spec: dict) -> tuple[list[str], list[dict]]:
    path = PAPER_DIR / spec["csv"]
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
    except OSError as e:
        raise UserError(f"paper table is unreadable ({e})", path=path, fix="restore results/paper/ from git")
    unmapped = [c for c in fields if c not in spec["row_key"] and c not in spec["columns"]]
    missing = [c for c in spec["row_key"] if c not in fields]
    if unmapped or missing:
        raise UserError(f"paper table columns {unmapped or missing} are not "
                        f"{'mapped' if unmapped else 'in the csv'}", path=spec["_config"],
                        fix=f"map every column of {path.name} except the row key")
    return fields, rows


# ---------------------------------------------------------------- tables

@dataclass
class Row:
    keys: list[str]
    source: str  # "paper" or "measured"
    cells: list[float | None]
    notes: list[int | None] = field(default_factory=list)


@dataclass
class Table:
    number: int
    title: str
    key_columns: list[str]
    columns: list[str]
    rows: list[Row]
    notes: list[str]

    @property
    def measured_rows(self) -> list[Row]:
        return [r for r in self.rows if r.source == "measured"]


def _paper_cell(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value


def _column_sources(spec: dict, fields: list[str], records: list[dict]) -> dict[str, tuple[str, str, str]]:
    """The paper's columns in its order, then extra measured datasets (sorted) that no column names."""
    sources = {c: spec["columns"][c] for c in fields if c in spec["columns"]}
    mapped = set(sources.values())
    extras = {}
    for rule in spec["extra"]:
        for r in records:
            triple = (rule["task"], r["dataset"]["name"], rule["metric"])
            if r["task"]["name"] != rule["task"] or triple in mapped or metric_value(r["metrics"], rule["metric"]) is None:
                continue
            name = rule["column"].replace("{dataset}", triple[1])
            if name in sources or (name in extras and extras[name] != triple):
                name = f"{name} ({triple[0]} {triple[2]})"
            extras[name] = triple
    sources.update(sorted(extras.items()))
    return sources


def _fmt_value(value: float | None, empty: str) -> str:
    if value is None:
        return empty
    return "nan" if math.isnan(value) else f"{value:.1f}"


def build_table(number: int, spec: dict, records: list[dict], *, paper_rows: bool = True) -> Table:
    fields, paper = read_paper_csv(spec)
    keys = spec["row_key"]
    sources = _column_sources(spec, fields, records)
    columns = list(sources)
    rows = []
    if paper_rows:
        for p in paper:
            rows.append(Row([p[k] for k in keys], "paper", [_paper_cell(p.get(c)) for c in columns], [None] * len(columns)))

    # (label, triple) -> records giving that cell; labels in a stable order.
    wanted = {}
    for column, triple in sources.items():
        wanted.setdefault(triple, column)
    cells: dict[tuple[str, tuple], list[dict]] = {}
    order: dict[str, tuple] = {}
    for r in records:
        for metric in {t[2] for t in wanted if t[0] == r["task"]["name"] and t[1] == r["dataset"]["name"]}:
            if metric_value(r["metrics"], metric) is None:
                continue
            label = model_label(r)
            cells.setdefault((label, (r["task"]["name"], r["dataset"]["name"], metric)), []).append(r)
            order[label] = label_sort_key(r)

    notes: list[str] = []
    for label in sorted(order, key=lambda lab: order[lab]):
        row_keys = [label] + [str(spec["measured_keys"].get(k, "")) for k in keys[1:]]
        values, marks = [], []
        for column in columns:
            found = newest_first(cells.get((label, sources[column]), []))
            if not found:
                values.append(None)
                marks.append(None)
                continue
            task, dataset, metric = sources[column]
            values.append(metric_value(found[0]["metrics"], metric))
            if len(found) == 1:
                marks.append(None)
                continue
            def where(r):
                return f"{_fmt_value(metric_value(r['metrics'], metric), '-')} ({r.get('created')}, {r['_relpath']})"
            notes.append(f"{label}, {task} {dataset} {metric}: {len(found)} records; shown the newest, "
                         f"{where(found[0])}; older: " + "; ".join(where(r) for r in found[1:]))
            marks.append(len(notes))
        rows.append(Row(row_keys, "measured", values, marks))
    return Table(number, spec["title"], keys, columns, rows, notes)


# ---------------------------------------------------------------- rendering

def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(table: Table) -> str:
    header = [*table.key_columns, "source", *table.columns]
    lines = [f"Table {table.number}: {table.title}", "",
             "| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "---|" * (len(table.key_columns) + 1) + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = [_fmt_value(v, "-") + (f" [{n}]" if n else "") for v, n in zip(row.cells, row.notes)]
        keys = [_md_escape(k) if k else "-" for k in row.keys]
        lines.append("| " + " | ".join([*keys, row.source, *cells]) + " |")
    if table.notes:
        lines.append("")
        lines.extend(f"[{i}] {_md_escape(note)}" for i, note in enumerate(table.notes, 1))
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def render_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); footnotes follow the tabular."""
    header = [*table.key_columns, "source", *table.columns]
    lines = [f"% Table {table.number}: {latex_escape(table.title)}",
             r"\begin{tabular}{" + "l" * (len(table.key_columns) + 1) + "r" * len(table.columns) + "}",
             r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    previous = None
    for row in table.rows:
        if previous is not None and previous != row.source:
            lines.append(r"\midrule")
        previous = row.source
        cells = [_fmt_value(v, "--") + (f"$^{{{n}}}$" if n else "") for v, n in zip(row.cells, row.notes)]
        keys = [latex_escape(k) if k else "--" for k in row.keys]
        lines.append(" & ".join([*keys, row.source, *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines.extend(rf"{{\footnotesize $^{{{i}}}$ {latex_escape(note)}\par}}" for i, note in enumerate(table.notes, 1))
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """Plain cells (one decimal, empty when not run) so the file loads as numbers; notes go elsewhere."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.key_columns, "source", *table.columns])
    for row in table.rows:
        writer.writerow([*row.keys, row.source, *(_fmt_value(v, "") for v in row.cells)])
    return buf.getvalue()


RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv}


def render(table: Table, fmt: str) -> str:
    return RENDERERS[fmt](table)


# ---------------------------------------------------------------- command

def parse_tables(text: str | None, config: dict) -> list[int] | None:
    if text is None:
        return None
    numbers = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            number = int(item.removeprefix("table"))
        except ValueError:
            number = None
        if number not in config:
            raise UserError(f"unknown table {item!r}", path=TABLES_CONFIG,
                            fix=f"give comma-separated table numbers from {', '.join(map(str, config))}")
        if number not in numbers:
            numbers.append(number)
    if not numbers:
        raise UserError(f"empty table list {text!r}", fix="give comma-separated table numbers, e.g. --tables 2,6")
    return numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", action="append", metavar="DIR",
                        help=f"folder (searched recursively) or file of result records; repeatable (default {DEFAULT_RECORDS})")
    parser.add_argument("--tables", help="comma-separated paper table numbers (default: every table the records fill)")
    parser.add_argument("--format", choices=list(FORMATS), default="md", help="md (default), latex (booktabs) or csv")
    parser.add_argument("--out", metavar="DIR", help="write table{N}.{md,tex,csv} here instead of printing")
    parser.add_argument("--no-paper-rows", action="store_true", help="only measured rows, not the paper's")
    parser.add_argument("--html", metavar="DIR",
                        help="also write one page, DIR/index.html (+ its images beside it): every table, with each "
                             "measured cell's provenance on hover, qualitative panels from records run with "
                             "--save-predictions, and plots")
    parser.add_argument("--data-root", help="where the datasets of the qualitative panels are (as for `run`)")


def main(args: argparse.Namespace) -> int:
    config = load_tables_config()
    numbers = parse_tables(args.tables, config)
    dirs = args.records or [DEFAULT_RECORDS]
    records = load_records(dirs)
    tables = [build_table(n, config[n], records, paper_rows=not args.no_paper_rows) for n in (numbers or config)]
    if getattr(args, "html", None):  # the page shows every table (1-6), filled or not
        from silc_bench.results.html import write_html

        page = write_html(args.html, records, tables, config, data_root=getattr(args, "data_root", None))
        print(f"wrote {page}")
        return 0
    if numbers is None:
        tables = [t for t in tables if t.measured_rows]
        if not tables:
            raise UserError(f"no result record fills a cell of any paper table ({len(records)} records read)",
                            path=", ".join(map(str, dirs)),
                            fix="run `silc-bench run TASK --model M` first, or pass --records DIR or --tables N")
    for i, table in enumerate(tables):
        text = render(table, args.format)
        if args.out:
            path = Path(args.out) / f"table{table.number}.{FORMATS[args.format]}"
            atomic_write_text(path, text)
            print(f"wrote {path} ({len(table.measured_rows)} measured rows)")
        else:
            print(("\n" if i else "") + text, end="")
        if args.format == "csv":  # CSV cells stay plain numbers; say which cells had several records
            for n, note in enumerate(table.notes, 1):
                print(f"table{table.number}.csv note [{n}]: {note}", file=sys.stderr)
    return 0
