"""`silc-bench report --html DIR`: the paper's tables, qualitative panels and plots as one HTML page.

Everything the page shows lies in DIR (index.html plus PNGs beside it, linked by relative names); no network.
"""

from __future__ import annotations

import colorsys
import os
import re
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from silc_bench.results import report as rep


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Deterministic class colours (golden-ratio hue walk); used for the panels and for the legend."""
    out = []
    for c in range(num_classes):
        h = (c * 0.618033988749895) % 1.0
        s = 0.65 + 0.3 * ((c // 7) % 2)
        v = 0.95 - 0.25 * ((c // 3) % 2)
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out.append((int(round(r * 255)), int(round(g * 255)), int(round(b * 255))))
    return out


IGNORE_COLOUR = (0, 0, 0)


def hex_colour(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def colourize(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    lut = np.zeros((max(num_classes, int(labels.max(initial=0)) + 1, 256), 3), np.uint8)
    lut[:num_classes] = np.array(palette(num_classes), np.uint8).reshape(-1, 3)
    out = lut[labels.astype(np.int64)]
    out[labels == ignore_index] = IGNORE_COLOUR
    return out


def _provenance(record: dict) -> str:
    model = record.get("model", {})
    ck = model.get("checkpoint_sha256") or model.get("sha256") or model.get("weights_sha256") or "?"
    ds = record.get("dataset", {})
    return (f"{record['task']['name']} {ds.get('name')}; checkpoint {str(ck)[:12]}; "
            f"protocol {str(record.get('protocol_sha256', '?'))[:12]}; "
            f"{'limited to %s images' % ds.get('limit') if ds.get('limited') else 'full split'}; "
            f"created {record.get('created')}")


def table_view(table: rep.Table, spec: dict, records: list[dict]) -> dict:
    sources = rep._column_sources(spec, rep.read_paper_csv(spec)[0], records)
    rows = []
    for row in table.rows:
        cells = []
        for column, value in zip(table.columns, row.cells):
            title = ""
            if row.source == "measured":
                task, dataset, metric = sources[column]
                found = rep.newest_first([r for r in records if rep.model_label(r) == row.keys[0]
                                          and r["task"]["name"] == task and r["dataset"]["name"] == dataset
                                          and rep.metric_value(r["metrics"], metric) is not None])
                if found:
                    title = _provenance(found[0])
            cells.append({"text": rep._fmt_value(value, "-"), "title": title, "column": column})
        rows.append({"key_values": row.keys, "source": row.source, "cells": cells})
    return {"number": table.number, "title": table.title, "key_columns": table.key_columns,
            "columns": table.columns, "rows": rows, "notes": table.notes}


def _prediction_dir(record: dict) -> Path | None:
    if not record.get("predictions") or not record.get("_path"):
        return None
    path = Path(record["_path"])
    d = path.with_name(path.stem + ".predictions")
    return d if d.is_dir() else None


def _open_dataset(record: dict, data_root):
    from silc_bench import registry
    from silc_bench.harness import get_harness

    task = registry.task_spec(record["task"]["name"])
    ds = record["dataset"]
    return get_harness(task).open_dataset(ds["name"], data_root, limit=ds.get("limit"))


def panels(records: list[dict], out: Path, data_root, max_images: int = 4) -> list[dict]:
    """Figures 3/4: image, model A, model B, ground truth for the images where A and B differ most."""
    groups: dict[tuple, list[dict]] = {}
    for r in rep.newest_first(records):
        if _prediction_dir(r) is not None:
            key = (r["task"]["name"], r["dataset"]["name"], r["dataset"].get("limit"))
            if all(rep.model_label(x) != rep.model_label(r) for x in groups.get(key, [])):
                groups.setdefault(key, []).append(r)
    result = []
    for (task, dname, _), recs in groups.items():
        if len(recs) < 2:
            continue
        a, b = sorted(recs[:2], key=rep.label_sort_key)
        try:
            dataset = _open_dataset(a, data_root)
        except Exception as err:  # noqa: BLE001 - the page is still useful without panels
            rep.warn(f"no qualitative panel for {task} {dname}: {err}")
            continue
        n_cls = int(dataset.num_classes)
        ignore = int(getattr(dataset, "ignore_index", 255))
        raw = list(getattr(dataset, "classnames", None) or [str(c) for c in range(n_cls)])
        names = [n[0] if isinstance(n, (list, tuple)) else str(n) for n in raw]
        scored = []
        for i in range(len(dataset)):
            sample = dataset[i]
            stem = Path(str(sample["name"])).stem
            pa, pb = _prediction_dir(a) / f"{stem}.png", _prediction_dir(b) / f"{stem}.png"
            if not (pa.exists() and pb.exists()):
                continue
            ma, mb = np.asarray(Image.open(pa)), np.asarray(Image.open(pb))
            scored.append((float((ma != mb).mean()), i, stem, ma, mb, sample))
        scored.sort(key=lambda t: (-t[0], t[1]))
        images, used = [], set()
        slug = f"{task}_{dname}".replace("/", "_").replace("@", "_")
        for diff, i, stem, ma, mb, sample in scored[:max_images]:
            label = np.asarray(sample["label"])
            img = np.asarray(sample["image"]).transpose(1, 2, 0).astype(np.uint8)
            if img.shape[:2] != label.shape:
                img = np.asarray(Image.fromarray(img).resize(label.shape[::-1], Image.BILINEAR))
            files = {}
            for kind, arr in (("image", img), ("a", colourize(ma, n_cls, ignore)),
                              ("b", colourize(mb, n_cls, ignore)), ("gt", colourize(label, n_cls, ignore))):
                name = f"panel_{slug}_{stem}_{kind}.png"
                Image.fromarray(arr).save(out / name)
                files[kind] = name
            for m in (ma, mb, label):
                used.update(int(c) for c in np.unique(m) if int(c) < n_cls)
            images.append({"stem": stem, "diff": f"{100 * diff:.1f}", **files})
        colours = palette(n_cls)
        legend = [{"id": c, "name": names[c], "colour": hex_colour(colours[c])} for c in sorted(used)]
        result.append({"task": task, "dataset": dname, "a": rep.model_label(a), "b": rep.model_label(b),
                       "images": images, "legend": legend})
        plot_per_class(a, b, names, out / f"perclass_{slug}.png")
        result[-1]["perclass"] = f"perclass_{slug}.png"
    return result


def plot_per_class(a: dict, b: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pa, pb = a.get("per_class") or {}, b.get("per_class") or {}

    def iou(pc, c):
        v = pc.get("IoU", pc.get("iou")) if isinstance(pc, dict) else None
        if isinstance(v, dict):
            return v.get(names[c])
        if isinstance(v, list) and c < len(v):
            return v[c]
        return None

    rows = [(names[c], iou(pa, c), iou(pb, c)) for c in range(len(names))]
    rows = [(n, x, y) for n, x, y in rows if x is not None and y is not None]
    rows.sort(key=lambda t: t[2] - t[1])
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(rows) + 1)), dpi=80)
    ys = np.arange(len(rows))
    ax.barh(ys - 0.2, [x for _, x, _ in rows], 0.4, label=rep.model_label(a))
    ax.barh(ys + 0.2, [y for _, _, y in rows], 0.4, label=rep.model_label(b))
    ax.set_yticks(ys, [n for n, _, _ in rows], fontsize=7)
    ax.set_xlabel("IoU (%)")
    ax.set_title("per-class IoU, sorted by difference (B - A)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SEED = re.compile(r"[-_.]?(?:seed|s)(\d+)$")


def seed_family(record: dict) -> tuple[str, int] | None:
    """(model family, seed) when the model's name ends in a seed (`..._s1`, `...-seed2`, or a run
    folder so named holding model.npz); None otherwise."""
    spec = str(record.get("model", {}).get("spec") or rep.model_label(record))
    name = Path(spec).parent.name if Path(spec).name == "model.npz" else Path(spec).stem
    m = SEED.search(name)
    return (name[:m.start()], int(m.group(1))) if m else None


def plot_seeds(records: list[dict], path: Path) -> bool:
    """Spread over seeds of each (task, dataset, model family) with two seeds or more: one point
    per seed, a line from the lowest to the highest, the primary metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[int, float]] = {}
    for r in rep.newest_first(records):
        fam = seed_family(r)
        value = rep.metric_value(r["metrics"], r["metric"]["primary"]) if fam else None
        if value is None:
            continue
        key = f"{r['task']['name']} {r['dataset']['name']} {r['metric']['primary']}: {fam[0]}"
        groups.setdefault(key, {}).setdefault(fam[1], value)
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(groups) + 1.5), dpi=80)
    for k, name in enumerate(sorted(groups)):
        values = list(groups[name].values())
        ax.scatter(values, [k] * len(values), s=18)
        ax.plot([min(values), max(values)], [k, k], lw=1)
    ax.set_yticks(range(len(groups)), sorted(groups), fontsize=7)
    ax.set_title("spread over seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_ladder(view: dict, path: Path) -> bool:
    """Table 6's ladder (CLIP -> + views -> + EMA teacher -> SILC): the measured rows' numbers per
    column as grouped bars; False when no row is measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in view["rows"] if r["source"] == "measured"]
    columns = [c for c in view["columns"]
               if any(_number(cell["text"]) is not None for r in rows for cell in r["cells"] if cell["column"] == c)]
    if not rows or not columns:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(columns) + 2), 3.2), dpi=80)
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        vals = [_number(next(c["text"] for c in r["cells"] if c["column"] == col)) or 0.0 for col in columns]
        ax.bar(np.arange(len(columns)) + k * width, vals, width, label=str(r["key_values"][0]))
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, fontsize=7, rotation=20)
    ax.set_title(f"Table {view['number']}: measured rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def write_html(out_dir, records: list[dict], tables: list[rep.Table], config: dict, *, data_root=None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    views = [table_view(t, config[t.number], records) for t in tables]
    panel_views = panels(records, out, data_root)
    seeds = "seeds.png" if plot_seeds(records, out / "seeds.png") else None
    for view in views:
        view["plot"] = f"table{view['number']}.png" if view["number"] == 6 and plot_ladder(
            view, out / f"table{view['number']}.png") else None
    env = Environment(loader=PackageLoader("silc_bench.results", "templates"), autoescape=select_autoescape(["html"]))
    text = env.get_template("report.html.j2").render(tables=views, panels=panel_views, seeds=seeds)
    tmp = out / ".index.html.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "index.html")
    return out / "index.html"
