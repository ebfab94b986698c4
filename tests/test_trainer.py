"""The pretraining loop: exact resume after a kill, two processes equal one, the export loads back.

Tiny models (width 32, depth 1, 32-px images) and a handful of steps keep this under a minute.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from silc_bench.errors import UserError
from silc_bench.pretrain.trainer import build_student, load_config, main

STEPS = 6


def _tiny(variant: str) -> dict:
    return {
        "variant": variant,
        "model": {"img": {"width": 32, "depth": 1, "heads": 2, "patch_size": 8, "grid": [4, 4], "pool_type": "map"},
                  "txt": {"vocab_size": 256, "width": 32, "depth": 1, "heads": 2, "length": 16, "out_dim": 32}},
        "tokenizer": {"kind": "sentencepiece", "file": "assets/toyworld_sp.model", "context_length": 16,
                      "pad_id": 1, "lowercase": True, "eos": "sticky"},
        "data": {"kind": "toyworld", "seed": 0, "length": 1000, "size": 32},
        "multicrop": {"global_size": 32, "local_size": 16, "n_local": 4},
        "distill": {"out_dim": 64, "hidden": 32, "bottleneck": 16},
        "optim": {"lr": 0.01, "warmup_steps": 2, "cooldown_steps": 2},
        "train": {"batch_size": 8, "steps": STEPS, "seed": 0, "ckpt_every": 2, "prefetch": False},
    }


def _env() -> dict:
    # one thread, as in this process (fixture below), so the subprocess's sums run in the same order
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(out_dir) -> list[tuple[int, float]]:
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrain_cfg")
    paths = {}
    for v in ("silc-c", "silc-s", "clip"):
        paths[v] = d / f"{v}.yaml"
        paths[v].write_text(yaml.safe_dump(_tiny(v)))
    return paths


@pytest.fixture(scope="module")
def runs(configs, tmp_path_factory):
    """Uninterrupted one-process runs, in this process."""
    d = tmp_path_factory.mktemp("pretrain_runs")
    for v, cfg in configs.items():
        assert main(["--config", str(cfg), "--out", str(d / v)]) == 0
    return {v: d / v for v in configs}


def test_kill_and_resume_reproduce_the_uninterrupted_run(configs, runs, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "silc_bench.pretrain.trainer", "--config", str(configs["silc-c"]), "--out", str(out)]
    # SIGKILL after step 5 finished; the last checkpoint is the one after step 4 (ckpt_every 2)
    proc = subprocess.run(cmd + ["--kill-at-step", "5"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (out / "model.npz").exists()
    with pytest.raises(UserError, match="--resume"):
        main(["--config", str(configs["silc-c"]), "--out", str(out)])
    assert main(["--config", str(configs["silc-c"]), "--out", str(out), "--resume"]) == 0

    ref, got = _losses(runs["silc-c"]), _losses(out)
    assert [s for s, _ in got] == list(range(STEPS))
    np.testing.assert_allclose([x for _, x in got], [x for _, x in ref], rtol=0, atol=1e-6)
    a, b = np.load(runs["silc-c"] / "model.npz"), np.load(out / "model.npz")
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_two_processes_match_one(configs, runs, tmp_path):
    """torchrun, 2 gloo processes with half the batch each: softmax (silc-c) and sigmoid (silc-s)."""
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(f"""
        from silc_bench.pretrain.trainer import Trainer, load_config, setup_distributed
        setup_distributed()
        for v, cfg in {json.dumps({v: str(configs[v]) for v in ("silc-c", "silc-s")})}.items():
            Trainer(load_config(cfg), {str(tmp_path)!r} + "/" + v).run()
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for v in ("silc-c", "silc-s"):
        ref, got = _losses(runs[v]), _losses(tmp_path / v)
        assert [s for s, _ in got] == [s for s, _ in ref]
        np.testing.assert_allclose([x for _, x in got], [x for _, x in ref], rtol=0, atol=1e-5, err_msg=v)


@pytest.mark.parametrize("variant,weights", [("silc-c", "teacher"), ("silc-s", "teacher"), ("clip", "student")])
def test_export_loads_with_the_trainers_embeddings(configs, runs, variant, weights):
    from silc_bench.checkpoints.big_vision import load_big_vision

    loaded = load_big_vision(runs[variant] / "model.npz")
    cfg = load_config(configs[variant])
    state = torch.load(runs[variant] / "checkpoint.pt", weights_only=True)
    own = build_student(cfg)
    own.load_state_dict(state[weights])
    own.eval().requires_grad_(False)
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = loaded.tokenize(["a red ball on grass", "a blue box", "snow"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), own.model.img(pixels)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode_text(tokens), own.model.txt(tokens)[0], rtol=1e-5, atol=1e-5)
        assert loaded.logit_scale == pytest.approx(float(own.model.t.exp()), rel=1e-6)
    if cfg["objective"]["loss"] == "sigmoid":
        assert loaded.logit_bias == pytest.approx(float(own.model.b), rel=1e-6)
    else:
        assert loaded.logit_bias is None
    if weights == "teacher":  # the EMA weights are exported, not the student's
        assert not torch.equal(state["teacher"]["model.t"], state["student"]["model.t"])


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"variant": "silc-c", "optim": {"learning_rate": 1}}))
    with pytest.raises(UserError, match="optim.'learning_rate'") as e:
        load_config(bad)
    assert str(bad) in str(e.value)
    bad.write_text(yaml.safe_dump({"variant": "dino"}))
    with pytest.raises(UserError, match="unknown variant"):
        load_config(bad)


def test_paper_defaults():
    cfg = load_config(None, {"variant": "silc-s"})
    assert cfg["objective"] == {"loss": "sigmoid", "contrastive_views": ["global"], "ema": True, "distill": True}
    assert cfg["multicrop"]["global_size"] == 256 and cfg["multicrop"]["local_size"] == 96
    assert cfg["distill"]["out_dim"] == 65536 and cfg["ema_momentum"] == 0.966
    assert cfg["optim"]["warmup_steps"] == cfg["optim"]["cooldown_steps"] == 50_000
    assert cfg["train"]["batch_size"] * cfg["train"]["steps"] >= 5e9


PAPER_ROWS = {"clip": "clip", "siglip": "siglip", "clip_views": "clip+views", "clip_views_ema": "clip+views+ema",
              "silc_c": "silc-c", "silc_s": "silc-s"}


def _config_file(name):
    from silc_bench.paths import CONFIGS_DIR

    return CONFIGS_DIR / "pretrain" / f"{name}.yaml"


def _plain(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_paper_configs_spell_out_the_defaults(name):
    assert _plain(load_config(_config_file(name))) == _plain(load_config(None, {"variant": PAPER_ROWS[name]}))


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_toy_configs_fit_the_toy_world(name):
    cfg = load_config(_config_file(f"toy_{name}"))
    assert cfg["variant"] == PAPER_ROWS[name]
    img, size = cfg["model"]["img"], cfg["data"]["size"]
    assert cfg["multicrop"]["global_size"] == size == img["grid"][0] * img["patch_size"] == 64
    assert cfg["tokenizer"]["context_length"] == cfg["model"]["txt"]["length"] == 16
    assert cfg["train"]["steps"] > 5 * cfg["optim"]["warmup_steps"]
