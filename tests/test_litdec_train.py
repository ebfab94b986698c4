"""LiT-Decoder training on the toy world (tiny backbone and decoder): the loss goes down, a killed run
resumes with identical losses, the export loads back and runs through the harness on every toy task
kind; the shipped toy tokenizer is what its recipe writes, and covers every toy answer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from silc_bench.checkpoints.litdec import load_litdec
from silc_bench.errors import UserError
from silc_bench.litdec.train import Trainer, collate, load_config
from training_helpers import Crash, crash_after

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = "silc_bench/assets/toyworld_decoder_sp.model"


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("lit_cfg")
    cfg = {"decoder": {"width": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "max_len": 24},
           "text": {"tokenizer": TOKENIZER},
           "prompts": {"classification": "what is this", "captioning": "caption", "vqa": "{question}"},
           "data": {"toyworld": {"num_images": 12, "seed": 0}, "weights": {"classification": 1.0, "captioning": 1.0,
                                                                          "vqa": 1.0}},
           "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"batch_size": 4, "steps": 6, "seed": 0, "ckpt_every": 2, "log_every": 1, "device": "cpu"}}
    path = root / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trainer(path, npz, out, **train):
    return Trainer(load_config(path, {"train": train} if train else None), str(npz), out)


@pytest.fixture(scope="module")
def trained(cfg_path, tiny_big_vision_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("lit_run")
    return out, _trainer(cfg_path, tiny_big_vision_npz, out).run()


def test_loss_goes_down(cfg_path, tiny_big_vision_npz, tmp_path):
    recs = _trainer(cfg_path, tiny_big_vision_npz, tmp_path / "long", steps=40).run()
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_kill_and_resume_continue_identically(trained, cfg_path, tiny_big_vision_npz, tmp_path):
    full = [r["loss"] for r in trained[1]]
    out, first = tmp_path / "killed", []
    with pytest.raises(Crash):
        _trainer(cfg_path, tiny_big_vision_npz, out).run(callbacks=[crash_after(3, first)])
    with pytest.raises(UserError, match="--resume"):
        _trainer(cfg_path, tiny_big_vision_npz, out).run()
    rest = _trainer(cfg_path, tiny_big_vision_npz, out).run(resume=True)
    assert [r["step"] for r in rest] == [2, 3, 4, 5]
    assert [r["loss"] for r in first] == full[:3] and [r["loss"] for r in rest] == full[2:]


def test_export_records_its_recipe_and_runs_every_toy_task(trained, tmp_path):
    out, _ = trained
    meta = json.loads((out / "litdec.json").read_text())
    assert meta["tokenizer"]["file"] == TOKENIZER and meta["training"]["steps_done"] == 6
    model = load_litdec(str(out))
    assert model.describe()["prompts"]["vqa"] == "{question}"
    cmd = [sys.executable, "-m", "silc_bench.cli", "run", "lit-decoder", "--model", str(out), "--datasets",
           "toyworld_cls,toyworld_vqa,toyworld_gqa", "--limit", "6", "--data-root", str(tmp_path / "data"),
           "--out", str(tmp_path / "runs"), "--no-progress", "--workers", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.json") if "shards" not in p.parts}
    assert len(records) == 3
    for r in records.values():
        assert 0 <= r["metrics"]["score"] <= 100 and r["metrics"]["num_examples"] == 6
        assert r["details"]["decoding"]["kv_cache"] is True
    beam = subprocess.run(cmd[:-2] + ["--protocol", "decoding=beam", "--protocol", "beams=3", "--datasets",
                                      "toyworld_vqa", "--out", str(tmp_path / "beam")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert beam.returncode == 0, beam.stderr[-3000:]
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "beam").rglob("*.json") if "shards" not in p.parts]
    assert rec["details"]["decoding"] == {"method": "beam", "beams": 3, "length_penalty": 0.0, "max_new_tokens": 24}


def test_collate_targets_only_the_answer():
    ids, mask, target = collate([([0, 5, 6, 7, 1], 2), ([0, 5, 1], 2)], pad=0)
    assert ids.tolist() == [[0, 5, 6, 7, 1], [0, 0, 0, 5, 1]]
    assert mask.tolist() == [[True] * 5, [False, False, True, True, True]]
    # row 0: prompt [5], answer [6, 7], EOS: positions 1..3 predict 6, 7, 1; row 1: empty answer, EOS only
    assert target.tolist() == [[-100, 6, 7, 1, -100], [-100, -100, -100, 1, -100]]


def test_shipped_toy_tokenizer_is_reproducible_and_covers_the_answers(tmp_path):
    from silc_bench.data.toy_vqa import train_decoder_tokenizer
    from silc_bench.litdec.text import TextCodec

    shipped = Path(__file__).parents[1] / TOKENIZER
    assert train_decoder_tokenizer(tmp_path / "sp.model").read_bytes() == shipped.read_bytes()
    codec = TextCodec(shipped)
    for text in ["2", "10", "yes", "no", "red", "how many kites?", "what is left of the kite?"]:
        assert 2 not in codec.encode(text) and codec.decode(codec.encode(text)) == text  # no unknown pieces


def test_shipped_configs_load():
    for path in sorted((Path(__file__).parents[1] / "configs" / "lit_decoder").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg["decoder"]["max_len"] > 0 and cfg["prompts"]


def test_torchrun_two_processes(cfg_path, tiny_big_vision_npz, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "silc_bench.litdec.train",
           "--model", str(tiny_big_vision_npz), "--config", str(cfg_path), "--out", str(tmp_path / "ddp"), "--steps", "2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "litdec.json").exists()
