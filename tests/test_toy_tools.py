"""Small pieces of the toy experiments (experiments/*.py): seen/unseen means, the seed summary, and
per-task dataset protocol overrides; the experiments run from a checkout as plain scripts."""
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from silc_bench import registry
from silc_bench.paths import PROJECT_DIR
from silc_bench.pretrain.trainer import load_config
from silc_bench.runner import protocol_for

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _experiment(name: str):
    """An experiments/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


catseg_toy_demo = _experiment("catseg_toy_demo")
seen_unseen = catseg_toy_demo.seen_unseen
toy_seeds = _experiment("toy_seeds")
toy_confusion = _experiment("toy_confusion")
toy_summary = _experiment("toy_summary")
summarise = toy_seeds.summarise


@pytest.mark.parametrize("script", ["toy_seeds.py", "catseg_toy_demo.py", "toy_confusion.py", "toy_summary.py"])
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


def test_catseg_demo_defaults_are_the_worlds_shipped_models(capsys):
    """Each world's default backbones are registry toy models pretrained on that world; a world with
    none asks for --backbones before anything runs."""
    for world, names in catseg_toy_demo.SHIPPED_BACKBONES.items():
        for name in names.split(","):
            words = shlex.split(registry.models()[name]["release"])
            recipe = load_config(PROJECT_DIR / words[words.index("--config") + 1])
            assert recipe["data"].get("world", 1) == world, name
    with pytest.raises(SystemExit) as stop:
        catseg_toy_demo.main(["--world", "3"])
    assert stop.value.code == 2 and "world 3 has no shipped toy models: pass --backbones" in capsys.readouterr().err


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
    """Thing pixels: own / same grid row / another row's thing in the picture / thing absent / stuff;
    stuff pixels: own / other stuff / thing in the picture / thing absent. Each outcome built by name."""
    from silc_bench.data.toyworld import CLASSES, STUFF_CLASSES, THING_CLASSES, THING_STYLE, THING_STYLE_V2

    c = {name: i for i, name in enumerate(CLASSES)}
    # ball, drum, cookie, clock: one grid row (red in world 2, disks in world 1); box the next row
    label = np.array([[c["ball"], c["ball"], c["ball"], c["ball"], c["ball"], c["ball"], c["grass"], c["grass"], c["grass"], c["grass"]],
                      [c["box"], c["cookie"], c["grass"], 255, c["sky"], c["sky"], c["sky"], c["sky"], c["sky"], c["sky"]]])
    pred = np.array([[c["ball"], c["drum"], c["cookie"], c["box"], c["kite"], c["sand"], c["grass"], c["sand"], c["box"], c["kite"]],
                     [c["box"], c["cookie"], c["grass"], c["kite"], c["sky"], c["sky"], c["sky"], c["sky"], c["sky"], c["sky"]]])
    counts = {"thing": np.zeros(5), "stuff": np.zeros(4)}
    toy_confusion.tally(label, pred, counts)
    # ball, box, cookie right | drum (absent) and cookie (present), same row | box | kite | sand
    assert counts["thing"].tolist() == [3, 2, 1, 1, 1]
    # 2 grass + 6 sky right | sand | box | kite; the 255 pixel is skipped
    assert counts["stuff"].tolist() == [8, 1, 1, 1]
    rows = toy_confusion.grid_rows()
    assert all(rows[c[name]] == -1 for name in STUFF_CLASSES)
    for style in (THING_STYLE, THING_STYLE_V2):  # a row is one colour (world 2) or one shape (world 1)
        by_row = {}
        for name in THING_CLASSES:
            by_row.setdefault(rows[c[name]], set()).add(style[name][0])
        assert len(by_row) == 6 and all(len(kinds) == 1 for kinds in by_row.values())


def test_confusion_script_reads_ade_labels_and_saved_predictions(tmp_path):
    """End to end on one 2x2 image: ADE labels (class k stored as k + 1, 0 unlabelled) against a
    saved prediction, found through the record and the dataset entry's folders."""
    from PIL import Image

    from silc_bench.data.toyworld import CLASSES

    c = {name: i for i, name in enumerate(CLASSES)}
    entry = registry.dataset_entry("toyworld_v2")
    assert toy_confusion.decode_labels(np.array([0, 1, 30, 255]), entry).tolist() == [255, 0, 29, 255]
    labels = tmp_path / "data" / entry["root"] / "annotations" / "validation"
    labels.mkdir(parents=True)
    Image.fromarray(np.array([[c["ball"] + 1, c["grass"] + 1], [c["grass"] + 1, 0]], np.uint8)).save(labels / "img1.png")
    record = tmp_path / "out" / "zs-seg" / "m" / "toyworld_v2.json"
    (record.parent / "toyworld_v2.predictions").mkdir(parents=True)
    fixture = json.loads((Path(__file__).parent / "fixtures/records/zs-seg/silc-c-b16/toyworld.json").read_text())
    fixture["model"]["sha256"] = "ab" * 32
    record.write_text(json.dumps(fixture))
    Image.fromarray(np.array([[c["ball"], c["box"]], [c["grass"], c["sky"]]], np.uint8)).save(
        record.parent / "toyworld_v2.predictions" / "img1.png")
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "toy_confusion.py"), "--records", str(tmp_path / "out"),
                           "--data-root", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = proc.stdout.strip().splitlines()[-1]
    assert row == "| m (sha256 abababababab) | 100.0 | 0.0 | 0.0 | 0.0 | 0.0 | 50.0 | 0.0 | 0.0 | 50.0 |"
    # a wrong --data-root: the label file is named with the fix, rc 2, and no table is started
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "toy_confusion.py"), "--records", str(tmp_path / "out"),
                           "--data-root", str(tmp_path / "elsewhere")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "img1.png: label file not found" in proc.stderr and "--data-root" in proc.stderr


def test_toy_summary_is_regenerated_from_the_committed_records():
    """results/toy/summary.md and the README's copy of its table are what the records say today."""
    table = toy_summary.summary_table(PROJECT_DIR / "results" / "toy")
    assert (PROJECT_DIR / "results" / "toy" / "summary.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    readme = (PROJECT_DIR / "README.md").read_text()
    assert all(line in readme.splitlines() for line in rows)
    main_job = next(line for line in rows if "`seeds_w2`" in line)  # the values the README's intro quotes
    assert "| 0-4 | 4.06 ± 1.25 | 5.93 ± 1.16 | 1.87 ± 1.34 | 5 of 5 | 1.5x | 3.1 |" in main_job


def test_toy_summary_pairs_clip_with_silc_and_checks_the_bar():
    def run(*mious):
        return {s: {"mIoU": m, "stuff": 0.0, "things": 0.0} for s, m in enumerate(mious)}

    row = toy_summary.compare({"clip_x": run(15.0, 16.0, 17.0), "clip_views_ema_x": run(20.0, 21.0, 22.0),
                               "clip_views_x": run(0.0, 0.0, 0.0), "silc_c_x": run(21.0, 22.0, 23.0)})
    assert row["lead"] == (6.0, 0.0) and row["ahead"] == 3 and row["distill_step"] == (1.0, 0.0)
    assert row["ratio"] == 6.0 and row["bar_met"]  # lead 6 = 6x the larger std (1), CLIP 16
    weak = toy_summary.compare({"clip": run(10.0, 12.0, 14.0), "silc_c": run(16.0, 18.0, 20.0)})
    assert weak["ratio"] == 3.0 and not weak["bar_met"]  # CLIP below 15
    assert toy_summary.compare({"clip": run(1.0)}) is None


def test_toy_summary_names_a_checkpoint_without_a_record(tmp_path):
    folder = tmp_path / "some_setting"
    (folder / "records" / "zs-seg").mkdir(parents=True)
    (folder / "table.md").write_text("| clip | 0 | `0123456789ab` |\n")
    with pytest.raises(SystemExit, match="checkpoint 0123456789ab .*rerun experiments/toy_seeds.py"):
        toy_summary.read_setting(folder)
