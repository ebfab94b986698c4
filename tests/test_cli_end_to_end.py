"""`silc-bench run zs-seg` end to end on generated datasets in the real layouts, and every bad input."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from silc_bench.cli import main
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.hashing import sha256_file
from silc_bench.results.record import read_record

SMALL = ["--protocol", "short_side=64", "--protocol", "crop=32", "--protocol", "stride=16"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_segmentation_fixture("ade150", root, num_images=3, size=(48, 64), seed=1)
    write_segmentation_fixture("pc59", root, num_images=3, size=(56, 48), seed=2)
    return root


def run_cli(*args):
    return main(["run", "zs-seg", "--workers", "0", "--no-progress", *args])


def records_under(out: Path) -> list[Path]:
    return [p for p in Path(out).rglob("*.json") if "shards" not in p.parts and "cache" not in p.parts]


def test_run_writes_valid_records_and_table(tiny_big_vision_npz, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model", str(tiny_big_vision_npz), "--datasets", "ade150,pc59", "--data-root", str(data_root),
                   "--out", str(out), *SMALL) == 0
    printed = capsys.readouterr().out
    assert "| SILC-C | paper | 19.3 | 31.6 | 26.9 | 77.5 | 20.8 |" in printed  # the paper's rows beside ours
    paths = sorted(records_under(out))
    assert [p.name for p in paths] == ["ade150.json", "pc59.json"]
    for path, num_classes in zip(paths, (150, 59)):
        rec = read_record(path)
        assert rec["task"] == {"name": "zs-seg", "version": 1, "spec_sha256": rec["task"]["spec_sha256"]}
        assert rec["model"]["sha256"] == sha256_file(tiny_big_vision_npz)
        assert rec["model"]["tokenizer"]["kind"] == "sentencepiece" and rec["model"]["tokenizer"]["sha256"]
        assert rec["details"]["num_templates"] == 80 and len(rec["details"]["prompt_set_sha256"]) == 64
        assert rec["details"]["dense_mode"] == "map_value"
        assert rec["protocol"]["short_side"] == 64 and rec["protocol"]["crop"] == 32
        assert rec["dataset"]["num_images"] == 3 and rec["dataset"]["limited"] is False
        assert 0 <= rec["metrics"]["mIoU"] <= 100 and 0 <= rec["metrics"]["aAcc"] <= 100
        assert len(rec["per_class"]["IoU"]) == num_classes
        assert rec["environment"]["versions"]["torch"] and "commit" in rec["environment"]["git"]
        assert rec["timing"]["images_per_second"] > 0
    table = (out / "zs-seg" / "table.md").read_text()
    assert str(tiny_big_vision_npz.name) in table and "measured" in table


def test_existing_pairs_are_skipped_and_damaged_records_recomputed(tiny_big_vision_npz, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--model", str(tiny_big_vision_npz), "--datasets", "ade150", "--data-root", str(data_root), "--out", str(out), *SMALL)
    assert run_cli(*args) == 0
    (path,) = records_under(out)
    first = read_record(path)
    capsys.readouterr()
    assert run_cli(*args) == 0
    assert "record exists" in capsys.readouterr().err
    assert read_record(path)["created"] == first["created"]
    path.write_text(path.read_text()[:100])  # a partial record is never used
    assert run_cli(*args) == 0
    assert read_record(path)["metrics"] == first["metrics"]


def test_limit_marks_records(tiny_big_vision_npz, data_root, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", str(tiny_big_vision_npz), "--datasets", "ade150", "--data-root", str(data_root),
                   "--out", str(out), "--limit", "1", *SMALL) == 0
    (path,) = records_under(out)
    rec = read_record(path)
    assert path.name == "ade150@limit1.json" and rec["dataset"]["limited"] and rec["dataset"]["num_images"] == 1


# ---------------------------------------------------------------- bad input

def expect_error(capsys, out, *args, mentions=()):
    code = run_cli("--out", str(out), *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "silc-bench: error:" in err
    for text in mentions:
        assert str(text) in err, err
    assert records_under(out) == [], "no result may be recorded for bad input"
    return err


def test_unknown_model_name(capsys, data_root, tmp_path):
    expect_error(capsys, tmp_path, "--model", "no-such-model", "--data-root", str(data_root), mentions=["no-such-model", "silc-c-b16"])


def test_missing_registry_checkpoint_names_file_flag_env_and_release(capsys, data_root, tmp_path):
    err = expect_error(capsys, tmp_path / "out", "--model", "silc-c-b16", "--checkpoint-dir", str(tmp_path / "ckpts"),
                       "--data-root", str(data_root), mentions=[tmp_path / "ckpts" / "silc_c_b16.npz", "--checkpoint-dir",
                                                                "SILC_BENCH_CHECKPOINTS"])
    assert "arXiv 2310.13355" in err


def _rewrite_npz(src, dst, edit):
    with np.load(src, allow_pickle=False) as z:
        params = dict(z)
    edit(params)
    np.savez(dst, **params)
    Path(f"{dst}.json").write_text(Path(f"{src}.json").read_text())
    return dst


def test_checkpoint_with_missing_key(tiny_big_vision_npz, capsys, data_root, tmp_path):
    key = "img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
    bad = _rewrite_npz(tiny_big_vision_npz, tmp_path / "bad.npz", lambda p: p.pop(key))
    expect_error(capsys, tmp_path / "out", "--model", str(bad), "--data-root", str(data_root), mentions=[bad, "Dense_0"])


def test_checkpoint_with_misshaped_key(tiny_big_vision_npz, capsys, data_root, tmp_path):
    key = "txt/head/kernel"

    def edit(p):
        p[key] = p[key][:, :-1]

    bad = _rewrite_npz(tiny_big_vision_npz, tmp_path / "bad.npz", edit)
    expect_error(capsys, tmp_path / "out", "--model", str(bad), "--data-root", str(data_root), mentions=[bad, "head"])


def test_missing_dataset_folder(tiny_big_vision_npz, capsys, tmp_path):
    expect_error(capsys, tmp_path / "out", "--model", str(tiny_big_vision_npz), "--datasets", "pc59",
                 "--data-root", str(tmp_path / "empty"), mentions=["VOC2010", "--data-root"])


@pytest.fixture
def private_root(tmp_path):
    root = tmp_path / "data"
    write_segmentation_fixture("ade150", root, num_images=2, size=(48, 64), seed=3)
    return root


def test_corrupt_image(tiny_big_vision_npz, capsys, private_root, tmp_path):
    image = sorted((private_root / "ADEChallengeData2016/images/validation").glob("*.jpg"))[1]
    image.write_bytes(b"\xff\xd8 not a jpeg")
    expect_error(capsys, tmp_path / "out", "--model", str(tiny_big_vision_npz), "--datasets", "ade150",
                 "--data-root", str(private_root), *SMALL, mentions=[image.name])


def test_label_outside_class_range(tiny_big_vision_npz, capsys, private_root, tmp_path):
    label = sorted((private_root / "ADEChallengeData2016/annotations/validation").glob("*.png"))[0]
    array = np.array(Image.open(label))
    array[0, 0] = 200  # ADE stores class k as k + 1: 200 -> class 199 of 150
    Image.fromarray(array).save(label)
    expect_error(capsys, tmp_path / "out", "--model", str(tiny_big_vision_npz), "--datasets", "ade150",
                 "--data-root", str(private_root), *SMALL, mentions=[label.name, "199"])


def test_bad_protocol_override(tiny_big_vision_npz, capsys, data_root, tmp_path):
    expect_error(capsys, tmp_path / "out", "--model", str(tiny_big_vision_npz), "--data-root", str(data_root),
                 "--protocol", "crop_size=3", mentions=["crop_size", "stride"])


def test_ls_lists_registries(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("silc-c-b16", "siglip-b16-256", "clip-b16", "zs-seg", "ade150", "pc59", "cityscapes"):
        assert name in out
