"""Command-line defects: bad --dense-mode, bad sizes, `train --help`, --out relative to the cwd, defaults in help."""
from pathlib import Path

import pytest

from silc_bench.cli import main
from silc_bench.data.fixtures import write_segmentation_fixture

SMALL = ["--protocol", "short_side=64", "--protocol", "crop=32", "--protocol", "stride=16"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_segmentation_fixture("ade150", root, num_images=2, size=(48, 64), seed=1)
    return root


def records_under(out: Path) -> list[Path]:
    return [p for p in Path(out).rglob("*.json") if "shards" not in p.parts and "cache" not in p.parts]


def run_cli(*args):
    return main(["run", "zs-seg", "--workers", "0", "--no-progress", *args])


def expect_error(capsys, out, *args):
    code = run_cli("--out", str(out), *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "silc-bench: error:" in err and "Traceback" not in err
    assert records_under(out) == [], "no result may be recorded for bad input"
    return err


# ---- 1: a typo in --dense-mode is a UserError naming the modes and how to pass one -----------------
@pytest.mark.parametrize("how", [["--dense-mode", "map_valu"], ["--protocol", "dense_mode=map_valu"]])
def test_unknown_dense_mode_is_a_user_error(tiny_big_vision_npz, data_root, tmp_path, capsys, how):
    err = expect_error(capsys, tmp_path / "out", "--model", str(tiny_big_vision_npz), "--datasets", "ade150",
                       "--data-root", str(data_root), *SMALL, *how)
    assert "'map_valu'" in err
    for mode in ("map_value", "map_value_no_mlp", "tokens"):  # the offered modes
        assert mode in err
    assert "--dense-mode NAME" in err and "--protocol dense_mode=NAME" in err


def test_dense_mode_error_is_user_error_and_value_error(tiny_big_vision_npz):
    from silc_bench.checkpoints import load_model
    from silc_bench.errors import UserError

    model = load_model(str(tiny_big_vision_npz))
    with pytest.raises(UserError) as e:
        model.check_dense_mode("bogus")
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do
    assert model.check_dense_mode(None) == model.default_dense_mode


# ---- 3: sizes that make no sense are refused; `train --help` works ---------------------------------
@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--workers", "-1"),
                                        ("--shard-size", "0"), ("--shard-size", "-2")])
def test_bad_sizes_are_refused(tiny_big_vision_npz, data_root, tmp_path, capsys, flag, value):
    err = expect_error(capsys, tmp_path / "out", "--model", str(tiny_big_vision_npz), "--datasets", "ade150",
                       "--data-root", str(data_root), *SMALL, flag, value)
    assert flag in err and value in err and "at least" in err


def test_train_help_lists_trainables(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "cat-seg" in out and "silc-bench train NAME --help" in out


def test_train_cat_seg_help_is_the_trainers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "cat-seg", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "silc-bench train cat-seg" in out and "--config" in out and "--model" in out


# ---- 8: --out is relative to the current directory; help shows defaults ------------------------------
def test_run_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: results/runs)" in out and "current directory" in out
    assert "(default: 32)" in out and "default: the cores beyond two, at most 4" in out  # --shard-size, --workers
    assert "default: the task's choice for the device, 16 on a GPU" in out  # --batch-size


@pytest.mark.parametrize("command", [["report"], ["compare"], ["export", "leaderboard"], ["ls"]])
def test_other_subcommands_use_the_defaults_formatter(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: silc-bench" in capsys.readouterr().out


def test_out_defaults_to_results_runs_under_the_cwd(tiny_big_vision_npz, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("--model", str(tiny_big_vision_npz), "--datasets", "ade150", "--data-root", str(data_root),
                   "--limit", "1", *SMALL) == 0
    (path,) = records_under(tmp_path / "results" / "runs")
    assert path.name == "ade150@limit1.json"


def test_toyworld_generation_says_where(tmp_path, monkeypatch, capsys):
    from silc_bench.data import segmentation, toyworld

    written = []

    def fake_write(root, *a, **k):  # the real one renders 500 images: only the note is under test
        written.append(Path(root))
        raise RuntimeError("stop after the note")

    monkeypatch.setattr(toyworld, "write_eval_split", fake_write)
    with pytest.raises(RuntimeError, match="stop after the note"):
        segmentation.open_dataset("toyworld", tmp_path / "droot")
    err = capsys.readouterr().err
    assert written == [tmp_path / "droot" / "toyworld"]
    assert str(tmp_path / "droot" / "toyworld") in err and "--data-root" in err and "SILC_BENCH_DATA" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 0), (3, 1), (6, 4), (64, 4)])
def test_default_workers_leave_two_cores_to_the_forward(monkeypatch, cores, workers):
    import os

    from silc_bench.data import loading

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loading.default_workers() == workers
