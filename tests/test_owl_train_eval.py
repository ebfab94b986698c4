"""OWL detection end to end on tiny toy data: training lowers the loss, a killed run resumes with
identical losses, the export loads back; evaluation scores an oracle at 100 AP (labels, category ids
and box format right), resumes after SIGKILL and gives the same record with 1 and 2 processes.
Backbone: the conftest big_vision SigLIP-style model (MAP head, no class token: "mul-ln" uses the
MAP head's pooled token)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from silc_bench.checkpoints.owl import load_owl
from silc_bench.data import toyworld
from silc_bench.detection.train import Trainer, load_config, main, train_categories
from silc_bench.errors import UserError
from silc_bench.results.record import read_record
from silc_bench.training.runtime import warmup_cosine_lr
from training_helpers import Crash, crash_after

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL_ARGS = ["--datasets", "toyworld_lvis", "--limit", "8", "--shard-size", "2", "--workers", "0", "--no-progress",
             "--protocol", "input_size=32", "--protocol", "top_k=50"]
SAME_KEYS = ("metrics", "per_class", "protocol", "protocol_sha256", "dataset", "details", "task")


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl_data")
    cfg = {"data": {"toyworld": {"root": "tw", "num_images": 8, "size": 48, "seed": 0}, "train_classes": "seen"},
           "input": {"size": 32}, "text": {"templates": "toyworld"}, "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"batch_size": 2, "steps": 6, "seed": 0, "ckpt_every": 2, "log_every": 1, "device": "cpu",
                     "workers": 0}}
    path = root / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root


def _trainer(toy_cfg, npz, out, **train):
    path, root = toy_cfg
    return Trainer(load_config(path, {"train": train} if train else None), str(npz), out, data_root=root)


@pytest.fixture(scope="module")
def trained(toy_cfg, tiny_big_vision_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("owl_run")
    records = _trainer(toy_cfg, tiny_big_vision_npz, out).run()
    return out, records


def test_training_lowers_the_loss_and_exports(trained, toy_cfg, tiny_big_vision_npz, tmp_path):
    out, records = trained
    assert [r["step"] for r in records] == list(range(6))
    long = _trainer(toy_cfg, tiny_big_vision_npz, tmp_path / "long", steps=40).run()
    first, last = sum(r["loss"] for r in long[:5]) / 5, sum(r["loss"] for r in long[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    det = load_owl(str(out))
    info = det.describe()
    assert info["heads"] == "trained" and info["global_token"] == "map" and info["merge"] == "mul-ln"
    meta = json.loads((out / "owl_detector.json").read_text())
    assert meta["training"]["steps_done"] == 6 and meta["finetune"] == "none"
    # the unseen classes are not trained on
    assert not set(meta["training"]["classes"]) & set(toyworld.UNSEEN_CLASSES)


def test_kill_and_resume_continue_identically(trained, toy_cfg, tiny_big_vision_npz, tmp_path):
    full = [r["loss"] for r in trained[1]]
    out = tmp_path / "killed"
    first = []
    with pytest.raises(Crash):  # after step 3; the last checkpoint is the one after step 2
        _trainer(toy_cfg, tiny_big_vision_npz, out).run(callbacks=[crash_after(3, first)])
    with pytest.raises(UserError, match="--resume"):
        _trainer(toy_cfg, tiny_big_vision_npz, out).run()
    rest = _trainer(toy_cfg, tiny_big_vision_npz, out).run(resume=True)
    assert [r["step"] for r in rest] == [2, 3, 4, 5]
    assert [r["loss"] for r in first] == full[:3] and [r["loss"] for r in rest] == full[2:]
    with pytest.raises(UserError, match="another config"):
        _trainer(toy_cfg, tiny_big_vision_npz, out, seed=1).run(resume=True)
    a = load_owl(str(out)).state_dict()
    b = load_owl(str(trained[0])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetuned_backbone_weights_travel_with_the_heads(toy_cfg, tiny_big_vision_npz, tmp_path):
    path, root = toy_cfg
    cfg = load_config(path, {"model": {"finetune": "qv"}, "train": {"steps": 2}})
    tr = Trainer(cfg, str(tiny_big_vision_npz), tmp_path / "qv", data_root=root)
    tr.run()
    det = load_owl(str(tmp_path / "qv"))
    tuned = dict(tr.model.named_parameters())
    for name, p in det.named_parameters():
        assert torch.equal(p.detach().cpu(), tuned[name].detach().cpu()), name
    from silc_bench.checkpoints import load_model
    fresh = load_model(str(tiny_big_vision_npz))  # the checkpoint on disk is untouched
    q = [n for n, _ in fresh.qv_parameters(("image",), "qv")][0]
    assert not torch.equal(dict(fresh.named_parameters())[q], dict(det.backbone.named_parameters())[q])


def test_schedule_and_class_choice():
    assert warmup_cosine_lr(0, 10, 1.0, 2) == 0.5 and warmup_cosine_lr(1, 10, 1.0, 2) == 1.0
    assert warmup_cosine_lr(2, 10, 1.0, 2) == pytest.approx(1.0) and warmup_cosine_lr(10, 10, 1.0, 2) == pytest.approx(0)

    class D:
        ground_truth = {"categories": [{"id": 3, "name": "a", "frequency": "r"}, {"id": 1, "name": "b"},
                                       {"id": 2, "name": "c", "unseen": True}]}
    assert train_categories(D, "seen") == [0] and train_categories(D, "all") == [0, 1, 2]
    assert train_categories(D, ["c"]) == [1]


def test_main_rejects_unknown_settings(tmp_path, tiny_big_vision_npz):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1.0, learning_rate: 2.0}\n")
    with pytest.raises(UserError, match="learning_rate"):
        main(["--model", str(tiny_big_vision_npz), "--config", str(bad), "--out", str(tmp_path / "o")])


# ---- evaluation -----------------------------------------------------------------------------------
def cli(*args, **kw):
    cmd = [sys.executable, "-m", "silc_bench.cli", "run", "ov-det", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def only_record(out: Path) -> dict:
    (path,) = [p for p in Path(out).rglob("*.json") if "shards" not in p.parts]
    return read_record(path)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    return tmp_path_factory.mktemp("owl_eval_data")


@pytest.fixture(scope="module")
def reference(trained, eval_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("owl_ref")
    done = cli("--model", str(trained[0]), "--data-root", str(eval_root), "--out", str(out), *EVAL_ARGS)
    assert done.returncode == 0, done.stderr
    return only_record(out)


def test_record_says_how_it_was_made(reference):
    assert reference["model"]["heads"] == "trained" and reference["model"]["global_token"] == "map"
    assert reference["details"]["templates"] == "toyworld" and "federated" in reference["details"]["evaluator"]
    m = reference["metrics"]
    assert {"AP", "APr", "APc", "APf"} <= set(m) and m["num_images"] == 8 and m["num_detections"] == 8 * 50


def test_oracle_detections_score_100(trained, eval_root):
    from silc_bench.harness import get_harness
    from silc_bench.registry import task_spec

    h = get_harness(task_spec("ov-det"))
    for name in ("toyworld_det", "toyworld_lvis"):
        ds = h.open_dataset(name, eval_root, limit=8)
        k = 10
        rows = {"index": [], "image_id": [], "scores": [], "labels": [], "boxes": []}
        cat_index = {c: i for i, c in enumerate(ds.category_ids)}
        for i, im in enumerate(ds.images):
            anns = [a for a in ds.ground_truth["annotations"] if a["image_id"] == im["id"]][:k]
            s, lab, box = torch.full((k,), -1.0), torch.full((k,), -1, dtype=torch.long), torch.zeros(k, 4)
            for j, a in enumerate(anns):
                s[j], lab[j], box[j] = 1.0 - 0.01 * j, cat_index[a["category_id"]], torch.tensor(a["bbox"])
            for key, v in (("index", i), ("image_id", im["id"]), ("scores", s), ("labels", lab), ("boxes", box)):
                rows[key].append(v)
        merged = {"examples": {k2: torch.tensor(v) if k2 in ("index", "image_id") else torch.stack(v)
                               for k2, v in rows.items()}}
        for agnostic in (False, True):
            prepared = type("Prepared", (), {"protocol": {"class_agnostic": agnostic}})
            metrics, _ = h.finalize(ds, merged, prepared)
            assert metrics["AP"] == pytest.approx(100.0), (name, agnostic)


def test_class_agnostic_diagnostic(reference, trained, eval_root, tmp_path):
    done = cli("--model", str(trained[0]), "--data-root", str(eval_root), "--out", str(tmp_path), *EVAL_ARGS,
               "--protocol", "class_agnostic=true")
    assert done.returncode == 0, done.stderr
    record = only_record(tmp_path)
    assert record["protocol"]["class_agnostic"] is True and "APr" not in record["metrics"]
    assert record["metrics"]["num_detections"] == 8 * 16  # one per patch: 32 px input, patch 8 -> 4 x 4
    assert record["metrics"]["AP"] >= 0


def test_two_gloo_processes_equal_one(reference, trained, eval_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "silc_bench.cli", "run", "ov-det", "--model", str(trained[0]),
           "--data-root", str(eval_root), "--out", str(tmp_path), "--device", "cpu", *EVAL_ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = only_record(tmp_path)
    assert record["timing"]["world_size"] == 2
    for key in SAME_KEYS:
        assert record[key] == reference[key], key


def test_sigkill_then_resume_gives_the_same_record(trained, eval_root, tmp_path):
    def shards(out):
        return [p for p in Path(out).rglob("shard*.pt") if Path(f"{p}.sha256").exists()]

    # 48 one-image shards: a toy image takes milliseconds, so the kill needs a wide window.
    args = ["--model", str(trained[0]), "--data-root", str(eval_root), *EVAL_ARGS]
    args[args.index("--shard-size") + 1], args[args.index("--limit") + 1] = "1", "48"
    uninterrupted = cli(*args, "--out", str(tmp_path / "whole"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "silc_bench.cli", "run", "ov-det", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while len(shards(killed)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(shards(killed)) < 48, "the run must be killed halfway"
    done = cli(*args, "--out", str(killed))
    assert done.returncode == 0, done.stderr
    assert "reused 0" not in done.stderr
    record, expected = only_record(killed), only_record(tmp_path / "whole")
    for key in SAME_KEYS:
        assert record[key] == expected[key], key


def test_shipped_configs_load():
    shipped = sorted((Path(__file__).parents[1] / "configs" / "owl").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"b16_960.yaml", "toy.yaml", "toy_w2.yaml"}
    for path in shipped:
        cfg = load_config(path)
        assert cfg["loss"]["focal_alpha"] == 0.3 and cfg["train"]["steps"] > 0


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    from silc_bench.cli import main as cli_main
    from silc_bench.data.fixtures_detection import write_coco_detection

    coco, lvis = write_coco_detection(tmp_path, num_images=2)
    coco.write_text("{not json")
    code = cli_main(["run", "ov-det", "--model", "untrained:toy-clip", "--datasets", "coco", "--data-root",
                     str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "instances_val2017.json" in err and "cannot read the annotation json" in err
    assert not list((tmp_path / "out").rglob("coco.json"))
    data = json.loads(lvis.read_text())
    del data["images"][0]["neg_category_ids"]
    lvis.write_text(json.dumps(data))
    code = cli_main(["run", "ov-det", "--model", "untrained:toy-clip", "--datasets", "lvis", "--data-root",
                     str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "federated" in capsys.readouterr().err
    code = cli_main(["run", "ov-det", "--model", "toy-clip", "--datasets", "lvis", "--data-root",
                     str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "no detection heads" in capsys.readouterr().err


def test_torchrun_two_processes_train(toy_cfg, tiny_big_vision_npz, tmp_path):
    """DDP on CPU (gloo): both ranks train, rank 0 exports a detector that loads."""
    path, root = toy_cfg
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "silc_bench.detection.train",
           "--model", str(tiny_big_vision_npz), "--config", str(path), "--out", str(tmp_path / "ddp"),
           "--data-root", str(root), "--steps", "2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_owl(str(tmp_path / "ddp")).describe()["heads"] == "trained"
    assert [json.loads(x)["step"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()] == [0, 1]
