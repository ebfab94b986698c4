"""`silc-bench report --html`: a page built from the toy world's records (zs-seg, run with
--save-predictions). Its table cells equal the records, the legend's colours equal the palette the
panels are drawn with, and in headless Chromium (Debian's `chromium`; `.ci/run` installs it where
missing) every image loads and nothing overflows the page width."""
import argparse
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from silc_bench import runner
from silc_bench.results import report as rep
from silc_bench.results.html import IGNORE_COLOUR, hex_colour, palette

pytestmark = pytest.mark.usefixtures("one_thread")


class _Page(HTMLParser):
    """Cells, legend swatches, images and the #checks element of the page."""

    def __init__(self):
        super().__init__()
        self.cells, self.swatches, self.images, self.checks, self._cell = [], [], [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and a.get("class") == "cell":
            self._cell = {**a, "text": ""}
        elif tag == "span" and a.get("class") == "sw":
            self.swatches.append(a)
        elif tag == "img":
            self.images.append(a["src"])
        elif a.get("id") == "checks":
            self.checks = a

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    opts = runner.RunOptions(data_root=str(root / "data"), out_dir=root / "runs", limit=6, save_predictions=True,
                             progress=False)
    records = runner.run("zs-seg", ["toy-clip", "toy-silc-c"], ["toyworld"], opts)
    args = argparse.Namespace(records=[str(root / "runs")], tables=None, format="md", out=None, no_paper_rows=False,
                              html=str(root / "page"), data_root=str(root / "data"))
    assert rep.main(args) == 0
    parsed = _Page()
    parsed.feed((root / "page" / "index.html").read_text())
    return root / "page", parsed, records


def test_predictions_are_stored_and_named_by_the_record(page):
    folder, _, records = page
    for r in records:
        assert r["predictions"]["count"] == 6 and r["predictions"]["format"] == "png-uint8"
    stored = list((folder.parent / "runs").rglob(records[0]["predictions"]["dir"]))
    assert len(stored) == 2  # one folder beside each model's record
    for d in stored:
        arrays = [np.asarray(Image.open(p)) for p in sorted(d.glob("*.png"))]
        assert len(arrays) == 6 and all(a.dtype == np.uint8 and a.max() < 30 for a in arrays)


def test_table_cells_equal_the_records(page):
    _, parsed, records = page
    measured = [c for c in parsed.cells if c["data-source"] == "measured" and c["data-column"] == "toyworld"]
    assert len(measured) == 2
    for r in records:
        label = rep.model_label(r)
        (cell,) = [c for c in measured if c["data-row"] == label]
        assert cell["text"].strip() == rep._fmt_value(r["metrics"]["mIoU"], "-")
        assert r["protocol_sha256"][:12] in cell["title"] and "limited to 6 images" in cell["title"]
    paper = [c for c in parsed.cells if c["data-source"] == "paper"]
    assert paper and all(re.fullmatch(r"[\d.]+|-", c["text"].strip()) for c in paper)
    html = (page[0] / "index.html").read_text()
    assert all(f'data-table="{n}"' in html for n in range(1, 7))  # every paper table, filled or not


def test_legend_colours_equal_the_panel_palette(page):
    folder, parsed, _ = page
    assert parsed.swatches
    colours = palette(30)
    for sw in parsed.swatches:
        assert sw["data-colour"] == hex_colour(colours[int(sw["data-class"])])
        assert f"background:{sw['data-colour']}" in sw["style"]
    allowed = {tuple(c) for c in colours} | {IGNORE_COLOUR}
    legend = {tuple(colours[int(sw["data-class"])]) for sw in parsed.swatches}
    for name in [s for s in parsed.images if s.startswith("panel_") and not s.endswith("_image.png")]:
        pixels = {tuple(p) for p in np.asarray(Image.open(folder / name).convert("RGB")).reshape(-1, 3)}
        assert pixels <= allowed and pixels - {IGNORE_COLOUR} <= legend, name
    assert all((folder / s).is_file() for s in parsed.images)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian package `chromium`; "
                                                  ".ci/run installs it where apt can)")
def test_page_in_headless_chromium(page, tmp_path):
    folder, parsed, _ = page
    url = (folder / "index.html").resolve().as_uri()
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
            "--virtual-time-budget=5000"]
    shot = tmp_path / "page.png"
    subprocess.run(base + [f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120, check=True)
    assert Image.open(shot).size == (1280, 900)
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    checks = _Page()
    checks.feed(dom)
    c = checks.checks
    assert c.get("data-done") == "1", "the page's load handler did not run"
    assert int(c["data-images"]) == len(parsed.images) > 0
    assert c["data-broken"] == "0", "an image did not load"
    assert c["data-overflow"] == "0", "the page is wider than the window"


def test_seed_spread_and_ladder_plots(tmp_path):
    from silc_bench.results.html import plot_ladder, plot_seeds, seed_family

    assert seed_family({"model": {"spec": "runs/w2_clip_s1/model.npz"}}) == ("w2_clip", 1)
    assert seed_family({"model": {"spec": "toy-clip-seed2"}}) == ("toy-clip", 2)
    assert seed_family({"model": {"spec": "toy-silc-c"}}) is None

    def rec(spec, value, created):
        return {"model": {"spec": spec}, "task": {"name": "zs-seg"}, "dataset": {"name": "toyworld_v2"},
                "metric": {"primary": "mIoU"}, "metrics": {"mIoU": value}, "created": created}

    records = [rec(f"runs/w2_clip_s{s}/model.npz", v, f"2026-12-0{s + 1}T00:00:00") for s, v in enumerate([6.2, 3.8, 4.1])]
    assert plot_seeds(records, tmp_path / "seeds.png") and Image.open(tmp_path / "seeds.png").size[0] > 100
    assert not plot_seeds(records[:1], tmp_path / "one.png")
    view = {"number": 6, "columns": ["a", "b"], "rows": [
        {"source": "paper", "key_values": ["CLIP"], "cells": [{"column": "a", "text": "1.0"}, {"column": "b", "text": "2.0"}]},
        {"source": "measured", "key_values": ["toy"], "cells": [{"column": "a", "text": "3.5"}, {"column": "b", "text": "-"}]}]}
    assert plot_ladder(view, tmp_path / "t6.png") and (tmp_path / "t6.png").stat().st_size > 0
    assert not plot_ladder({**view, "rows": view["rows"][:1]}, tmp_path / "none.png")
