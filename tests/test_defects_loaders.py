"""Loader defects: open_clip without weights must not silently use random weights; non-zip .npz files."""
import json
import os
import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from silc_bench.checkpoints import load_model
from silc_bench.checkpoints.big_vision import load_big_vision
from silc_bench.checkpoints.open_clip import load_open_clip
from silc_bench.cli import main
from silc_bench.errors import UserError

ARCH = "SilcDefects-ViT-Tiny"
TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc_cfg") / f"{ARCH}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return ARCH


# ---- 2: no weights is refused unless random init is asked for -------------------------------------
def test_open_clip_without_weights_is_refused(registered):
    with pytest.raises(UserError) as e:
        load_open_clip(registered, None)
    msg = str(e.value)
    assert "no pretrained weights" in msg and "random" in msg
    assert f"open_clip:{registered}:/path/weights.pt" in msg and f"open_clip:{registered}:random-init" in msg
    with pytest.raises(UserError):
        load_model(f"open_clip:{registered}")


def test_open_clip_random_init_is_explicit_and_recorded(registered):
    model = load_open_clip(registered, None, random_init=True)
    assert model.provenance["random_init"] is True and model.provenance["weights"] is None
    via_spec = load_model(f"open_clip:{registered}:random-init")
    d = via_spec.describe()
    assert d["random_init"] is True and d["spec"] == f"open_clip:{registered}:random-init"
    with pytest.raises(UserError, match="not both"):
        load_open_clip(registered, "/some/weights.pt", random_init=True)


def test_open_clip_with_weights_records_random_init_false(registered, tmp_path):
    model = open_clip.create_model(registered)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    assert load_open_clip(registered, path).provenance["random_init"] is False


def test_cli_refuses_open_clip_without_weights(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "zs-seg", "--model", "open_clip:ViT-B-16", "--datasets", "ade150", "--data-root",
                 str(tmp_path / "data"), "--out", str(out), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no pretrained weights" in err and "open_clip:ViT-B-16:random-init" in err
    assert not out.exists() or not list(out.rglob("*.json"))


# ---- 4: a file that is not a zip archive is "not a valid .npz", never "pickled data" ---------------
def _assert_not_npz_message(msg: str, path: Path):
    assert str(path) in msg and "not a valid .npz (zip) checkpoint" in msg
    assert "allow_pickle" not in msg and "pickle.load" not in msg and "unsafely" not in msg
    assert "fix:" in msg


def test_random_bytes_npz(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(UserError) as e:
        load_big_vision(path)
    _assert_not_npz_message(str(e.value), path)


def test_pickle_renamed_npz_is_not_unpickled(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps({"params": [1.0, 2.0]}))
    with pytest.raises(UserError) as e:
        load_big_vision(path)
    msg = str(e.value)
    _assert_not_npz_message(msg, path)
    assert "never loaded" in msg


def test_torch_zip_renamed_npz(tmp_path):
    path = tmp_path / "torch.npz"  # torch.save writes a zip archive, whose members are not .npy arrays
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UserError) as e:
        load_big_vision(path)
    assert str(path) in str(e.value) and "allow_pickle" not in str(e.value)


def test_truncated_npz(tiny_big_vision_npz, tmp_path):
    path = tmp_path / "cut.npz"
    path.write_bytes(tiny_big_vision_npz.read_bytes()[:2000])
    with pytest.raises(UserError) as e:
        load_big_vision(path)
    _assert_not_npz_message(str(e.value), path)
    assert "truncated" in str(e.value)


def test_cli_random_bytes_npz(tmp_path, capsys):
    path = tmp_path / "random.npz"
    path.write_bytes(os.urandom(1024))
    out = tmp_path / "out"
    code = main(["run", "zs-seg", "--model", str(path), "--datasets", "ade150", "--data-root", str(tmp_path),
                 "--out", str(out), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "not a valid .npz (zip) checkpoint" in err and "allow_pickle" not in err, err
