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
    # one thread, as in this process (the one_thread fixture), so the subprocess's sums run in the same order
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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
    # A hard preemption: SIGKILL after step 5 finished, from a callback of the loop; the last
    # checkpoint is the one after step 4 (ckpt_every 2), and step 4 is already in the log.
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from silc_bench.pretrain.trainer import Trainer, load_config

        def kill_after_step_5(done, stats):
            if done == 5:
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer(load_config({str(configs["silc-c"])!r}), {str(out)!r}).run(callbacks=[kill_after_step_5])
    """))
    proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=120)
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


def test_stop_at_step_pauses_and_resume_finishes_the_same_run(configs, runs, tmp_path):
    out = tmp_path / "paused"
    assert main(["--config", str(configs["clip"]), "--out", str(out), "--stop-at-step", "3"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3  # written at the pause
    assert not (out / "model.npz").exists()
    with pytest.raises(UserError, match="stop-at-step 2 is not after step 3"):
        main(["--config", str(configs["clip"]), "--out", str(out), "--resume", "--stop-at-step", "2"])
    assert main(["--config", str(configs["clip"]), "--out", str(out), "--resume"]) == 0
    ref, got = _losses(runs["clip"]), _losses(out)
    assert [s for s, _ in got] == list(range(STEPS))
    np.testing.assert_allclose([x for _, x in got], [x for _, x in ref], rtol=0, atol=1e-6)


def test_two_processes_match_one(configs, runs, tmp_path):
    """torchrun, 2 gloo processes with half the batch each: softmax (silc-c) and sigmoid (silc-s)."""
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(f"""
        from silc_bench.pretrain.trainer import Trainer, load_config
        from silc_bench.training.runtime import distributed
        with distributed():
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
def test_paper_configs_are_the_defaults_with_their_variant(name):
    """The paper's settings are stated once (settings.py): a paper recipe names only its variant."""
    assert set(yaml.safe_load(_config_file(name).read_text())) == {"variant"}
    assert _plain(load_config(_config_file(name))) == _plain(load_config(None, {"variant": PAPER_ROWS[name]}))


def test_every_default_comes_from_settings():
    import inspect

    from silc_bench.pretrain import objectives as obj
    from silc_bench.pretrain import settings
    from silc_bench.pretrain.multicrop import MultiCropConfig
    from silc_bench.pretrain.trainer import OVERRIDES, build_parser

    d = settings.defaults()
    cfg = _plain(load_config(None))
    assert {k: v for k, v in cfg.items() if k != "objective"} == {k: v for k, v in d.items() if k != "objective"}
    # the command line overrides a recipe only when given, and its help shows the default it overrides
    actions = {a.dest: a for a in build_parser()._actions}
    for option, (section, key) in OVERRIDES.items():
        assert actions[option].default is None
        assert f"default: {d[section][key]})" in actions[option].help
    # the dataclasses the trainer hands the settings to have the same defaults
    assert MultiCropConfig.from_dict(d["multicrop"]) == MultiCropConfig()
    assert (obj.TEACHER_TEMP, obj.STUDENT_TEMP, obj.CENTER_MOMENTUM, obj.EMA_MOMENTUM) == (
        d["distill"]["teacher_temp"], d["distill"]["student_temp"], d["distill"]["center_momentum"], d["ema_momentum"])
    head = inspect.signature(obj.DistillHead).parameters
    assert {k: head[k].default for k in ("out_dim", "hidden", "bottleneck", "layers")} == {
        k: d["distill"][k] for k in ("out_dim", "hidden", "bottleneck", "layers")}


def test_print_config_shows_every_setting(capsys):
    assert main(["--config", str(_config_file("silc_c")), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == _plain(load_config(_config_file("silc_c")))


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_toy_configs_fit_the_toy_world(name):
    cfg = load_config(_config_file(f"toy_{name}"))
    assert cfg["variant"] == PAPER_ROWS[name]
    img, size = cfg["model"]["img"], cfg["data"]["size"]
    assert cfg["multicrop"]["global_size"] == size == img["grid"][0] * img["patch_size"] == 64
    assert cfg["tokenizer"]["context_length"] == cfg["model"]["txt"]["length"] == 16
    assert cfg["train"]["steps"] > 5 * cfg["optim"]["warmup_steps"]
