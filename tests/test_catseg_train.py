"""CAT-Seg training on the toy world: the loss goes down, a killed run resumes at the same step with
identical losses, the exported checkpoint loads back; loss, schedule and class subset against
naive versions. Tiny: the conftest big_vision backbone (32 px, patch 8), 32-px crops, 8 images.
"""
import json
import math

import numpy as np
import pytest
import torch

from silc_bench.catseg.train import Trainer, bce_loss, class_subset, cosine_lr, load_config, main
from silc_bench.checkpoints.catseg import load_catseg
from silc_bench.data import toyworld
from silc_bench.errors import UserError
from training_helpers import Crash, crash_after


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors on 2 shared cores: intra-op threads only add contention (10-30x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HEAD = dict(crop_size=32, hidden_dim=16, num_heads=2, appearance_guidance_dim=8, text_guidance_dim=8,
            decoder_dims=[16, 16], decoder_guidance_dims=[8, 8], decoder_guidance_proj_dims=[4, 4], max_classes=32)


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("catseg_data")
    path = root / "toy.yaml"
    cfg = {"model": HEAD,
           "data": {"toyworld": {"root": "tw", "num_images": 8, "size": 48, "seed": 0}, "train_classes": "seen"},
           "augment": {"mode": "random_resized", "scale": [0.3, 1.0]},
           "optim": {"lr": 3e-3},
           "train": {"batch_size": 2, "steps": 6, "seed": 0, "ckpt_every": 2, "log_every": 1, "device": "cpu",
                     "workers": 0}}
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    return path, root


def _trainer(toy_cfg, npz, out, **train):
    path, root = toy_cfg
    cfg = load_config(path, {"train": train} if train else None)
    return Trainer(cfg, str(npz), out, data_root=root)


def test_toy_training_reduces_loss_and_exports(toy_cfg, tiny_big_vision_npz, tmp_path):
    trainer = _trainer(toy_cfg, tiny_big_vision_npz, tmp_path / "run", steps=10)
    assert trainer.classnames == [[c] for c in toyworld.SEEN_CLASSES]
    losses = [r["loss"] for r in trainer.run()]
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    meta = json.loads((tmp_path / "run" / "catseg.json").read_text())
    assert meta["backbone"]["sha256"] == trainer.backbone_sha and meta["train"]["steps_done"] == 10
    loaded = load_catseg(tmp_path / "run")
    px = torch.randn(1, 3, 32, 32)
    names = [["ball"], ["grass"]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(px, names), trainer.model.eval()(px, names))


def test_kill_and_resume_continue_identically(toy_cfg, tiny_big_vision_npz, tmp_path):
    full = [r["loss"] for r in _trainer(toy_cfg, tiny_big_vision_npz, tmp_path / "full").run()]
    out = tmp_path / "killed"
    first = []
    with pytest.raises(Crash):  # after step 3; the last checkpoint is the one after step 2
        _trainer(toy_cfg, tiny_big_vision_npz, out).run(callbacks=[crash_after(3, first)])
    assert [r["step"] for r in first] == [0, 1, 2]
    with pytest.raises(UserError, match="--resume"):
        _trainer(toy_cfg, tiny_big_vision_npz, out).run()
    resumed = _trainer(toy_cfg, tiny_big_vision_npz, out)
    rest = resumed.run(resume=True)
    assert [r["step"] for r in rest] == [2, 3, 4, 5]
    assert [r["loss"] for r in first] == full[:3] and [r["loss"] for r in rest] == full[2:]
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(6))
    with pytest.raises(UserError, match="another config"):  # a changed recipe refuses to resume
        _trainer(toy_cfg, tiny_big_vision_npz, out, seed=1).run(resume=True)
    assert (out / "catseg.json").exists()


def test_stop_at_step_pauses_with_a_checkpoint(toy_cfg, tiny_big_vision_npz, tmp_path):
    """--stop-at-step: a clean pause (checkpoint written, no export) that --resume continues."""
    path, root = toy_cfg
    out = tmp_path / "paused"
    args = ["--model", str(tiny_big_vision_npz), "--config", str(path), "--out", str(out), "--data-root", str(root),
            "--steps", "3"]
    assert main(args + ["--stop-at-step", "1"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1  # ckpt_every 2: written for the pause
    assert not (out / "catseg.json").exists()
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "catseg.json").read_text())["train"]["steps_done"] == 3
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_main_rejects_unknown_settings(tmp_path, tiny_big_vision_npz):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {learning_rate: 1.0}\n")
    with pytest.raises(UserError, match="learning_rate"):
        main(["--model", str(tiny_big_vision_npz), "--config", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text("model: {hidden_dim: 30, num_heads: 4}\n")
    with pytest.raises(UserError, match="divisible"):
        load_config(bad)


def test_bce_loss_matches_naive():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[0, :8] = 255
    got = bce_loss(logits, labels)
    total, count = 0.0, 0
    for b in range(2):
        for y in range(4):
            for x in range(4):
                t = int(labels[b, 4 * y, 4 * x])  # nearest: the top-left pixel of each 4x4 cell
                if t == 255:
                    continue
                for k in range(3):
                    z = float(logits[b, k, y, x])
                    total += -(math.log(1 / (1 + math.exp(-z))) if k == t else math.log(1 - 1 / (1 + math.exp(-z))))
                    count += 1
    assert math.isclose(float(got), total / count, rel_tol=1e-5)


def test_cosine_schedule_and_class_subset():
    assert cosine_lr(0, 100, 2e-4) == 2e-4 and math.isclose(cosine_lr(50, 100, 2e-4), 1e-4)
    assert cosine_lr(99, 100, 2e-4) < 1e-7
    names = [[c] for c in toyworld.CLASSES]
    kept, lut = class_subset(names, "seen", {"unseen_classes": list(toyworld.UNSEEN_CLASSES)})
    assert [k[0] for k in kept] == list(toyworld.SEEN_CLASSES)
    for i, c in enumerate(toyworld.CLASSES):
        assert lut[i] == (toyworld.SEEN_CLASSES.index(c) if c in toyworld.SEEN_CLASSES else 255)
    assert lut[255] == 255
    kept, lut = class_subset(names, ["sky", "ball"])
    assert kept == [["sky"], ["ball"]] and lut[toyworld.CLASSES.index("ball")] == 1
    with pytest.raises(UserError, match="unicorn"):
        class_subset(names, ["unicorn"])


def test_early_version_trains_with_cached_frozen_text(toy_cfg, tiny_big_vision_npz, tmp_path):
    path, root = toy_cfg
    cfg = load_config(path, {"model": {**HEAD, "version": "early", "templates": ["a {}.", "a photo of a {}."]},
                             "train": {"steps": 2}})
    trainer = Trainer(cfg, str(tiny_big_vision_npz), tmp_path / "early", data_root=root)
    assert trainer.text is not None and trainer.text.shape[:2] == (24, 2)
    pos = trainer.model.backbone.model.img.pos_embedding
    txt = trainer.model.backbone.model.txt.blocks[0].attn.query.weight
    before = (pos.detach().clone(), txt.detach().clone())
    trainer.run()
    assert not torch.equal(pos, before[0]) and torch.equal(txt, before[1])
    assert json.loads((tmp_path / "early" / "catseg.json").read_text())["catseg"]["version"] == "early"


@pytest.mark.slow
def test_torchrun_two_processes(toy_cfg, tiny_big_vision_npz, tmp_path):
    """DDP on CPU (gloo): both ranks train, rank 0 exports."""
    import os
    import subprocess
    import sys

    path, root = toy_cfg
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "silc_bench.catseg.train",
           "--model", str(tiny_big_vision_npz), "--config", str(path), "--out", str(tmp_path / "ddp"),
           "--data-root", str(root), "--steps", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_catseg(tmp_path / "ddp").describe()["method"] == "cat-seg"
    assert [json.loads(x)["step"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_shipped_configs_load():
    from pathlib import Path

    from silc_bench.catseg.model import CatSegConfig

    root = Path(__file__).resolve().parent.parent / "configs" / "cat_seg"
    cfgs = {p.stem: load_config(p) for p in sorted(root.glob("*.yaml"))}
    assert {"vitb_384", "vitb_384_early", "toy"} <= set(cfgs)
    paper = cfgs["vitb_384"]
    assert (paper["train"]["batch_size"], paper["train"]["steps"], paper["optim"]["lr"]) == (4, 80_000, 2e-4)
    assert CatSegConfig.from_dict(paper["model"]).crop_size == 384
    early = CatSegConfig.from_dict(cfgs["vitb_384_early"]["model"])
    assert early.text_encoder == "frozen" and early.finetune == "attention+pos" and early.crop_size == 384
    assert cfgs["vitb_384_early"]["optim"] == paper["optim"]
    assert cfgs["toy"]["data"]["train_classes"] == "seen"


def test_toy_training_split_of_world_2(tmp_path):
    """`data: {toyworld: {world: 2}}` trains on world-2 scenes (configs/cat_seg/toy_w2.yaml)."""
    from silc_bench.catseg.train import make_dataset

    cfg = {"data": {"toyworld": {"root": "tw2", "num_images": 3, "size": 48, "seed": 0, "world": 2}}}
    ds, names, entry = make_dataset(cfg, tmp_path)
    manifest = json.loads((tmp_path / "tw2" / "ADEChallengeData2016" / "toyworld_training.json").read_text())
    assert manifest["world_version"] == 2 and len(ds) == 3 and [n[0] for n in names] == list(toyworld.CLASSES)
    assert np.array_equal(ds[1]["label"].numpy(), toyworld.render(1, 0, 48, "train", world=2).labels)
