"""Small pieces of the toy experiments (experiments/*.py): seen/unseen means, the seed summary, and
per-task dataset protocol overrides; the experiments run from a checkout as plain scripts."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from silc_bench import registry
from silc_bench.runner import protocol_for

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _experiment(name: str):
    """An experiments/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seen_unseen = _experiment("catseg_toy_demo").seen_unseen
toy_seeds = _experiment("toy_seeds")
summarise = toy_seeds.summarise


@pytest.mark.parametrize("script", ["toy_seeds.py", "catseg_toy_demo.py", "toy_confusion.py"])
def test_experiments_run_as_scripts(script, tmp_path):
    """`python experiments/X.py --help` works from any folder, as a plain script (no `-m`)."""
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"experiments/{script}" in proc.stdout


def test_seen_unseen_means_skip_absent_classes():
    record = {"per_class": {"IoU": {"grass": 50.0, "kite": 10.0, "drum": 30.0, "sail": float("nan"), "tire": 0.0}}}
    seen, unseen = seen_unseen(record, {"drum", "sail", "tire"})
    assert seen == 30.0 and unseen == 15.0
    assert math.isnan(seen_unseen({"per_class": {"IoU": {"a": 1.0}}}, {"b"})[1])


def test_summarise_mean_and_sample_std():
    assert summarise([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert summarise([4.0]) == "4.00"


def test_stuff_and_thing_means_and_the_paired_difference_row():
    record = {"per_class": {"IoU": {"grass": 40.0, "sky": 20.0, "snow": float("nan"), "kite": 3.0, "drum": 1.0}}}
    assert toy_seeds.stuff_and_things(record) == (30.0, 2.0)
    lines = toy_seeds.table_lines([0, 1], [("clip", [1.0, 2.0]), ("silc_c", [2.5, 4.0])])
    assert lines[-1] == "| silc_c minus clip, same seed | 1.50 | 2.00 | 1.75 ± 0.35 |"
    assert len(toy_seeds.table_lines([0], [("clip", [1.0])])) == 3  # one variant: no difference row


class _Dataset:
    spec = registry.dataset_entry("toyworld")


def test_dataset_protocol_overrides_apply_to_their_task_only():
    zs = protocol_for(registry.task_spec("zs-seg"), _Dataset(), {"stride": 16})
    assert (zs["short_side"], zs["crop"], zs["stride"], zs["templates"]) == (96, 64, 16, "openai_imagenet_80")
    assert "out_res" not in zs
    ov = protocol_for(registry.task_spec("ov-seg"), _Dataset(), None)
    assert (ov["out_res"], ov["crop"], ov["stride"], ov["resize_short"]) == (96, 64, 32, None)
    assert "short_side" not in ov


def test_confusion_sorts_every_pixel_into_one_outcome():
    """Thing pixels: own / same grid row / other thing present / thing absent / stuff; stuff pixels:
    own / other stuff / thing present / thing absent. Each outcome built once, by class name."""
    import numpy as np

    from silc_bench.data.toyworld import CLASSES, THING_STYLE, THING_STYLE_V2

    confusion = _experiment("toy_confusion")
    c = {name: i for i, name in enumerate(CLASSES)}
    # grid rows: ball/drum/cookie/clock (red in world 2, disks in world 1); box/book/... the next row
    label = np.array([[c["ball"], c["ball"], c["ball"], c["ball"], c["ball"], c["grass"], c["grass"], c["grass"], c["grass"]],
                      [c["box"], c["grass"], 255, c["sky"], c["sky"], c["sky"], c["sky"], c["sky"], c["sky"]]])
    pred = np.array([[c["ball"], c["drum"], c["box"], c["kite"], c["sand"], c["grass"], c["sand"], c["box"], c["kite"]],
                     [c["box"], c["grass"], c["kite"], c["sky"], c["sky"], c["sky"], c["sky"], c["sky"], c["sky"]]])
    counts = {"thing": np.zeros(5), "stuff": np.zeros(4)}
    things = np.array([name not in ("grass", "sand", "water", "brick", "sky", "snow") for name in CLASSES])
    confusion.tally(label, pred, confusion.grid_rows(), things, counts)
    assert counts["thing"].tolist() == [2, 1, 1, 1, 1]     # ball+box right; drum; box; kite; sand
    assert counts["stuff"].tolist() == [8, 1, 1, 1]        # grass, 6 sky, grass; sand; box; kite (255 skipped)
    rows = confusion.grid_rows()
    assert rows[c["drum"]] == rows[c["ball"]] != rows[c["box"]] and rows[c["grass"]] == -1
    assert {THING_STYLE_V2[n][0] for n in CLASSES if rows[c[n]] == rows[c["ball"]]} == {"red"}
    assert {THING_STYLE[n][0] for n in CLASSES if rows[c[n]] == rows[c["ball"]]} == {"disk"}
