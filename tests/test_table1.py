"""Table 1 harnesses (zs-cls, fewshot, retrieval) against independent computations, their readers
on fixtures in the release layouts, and corpus-level records that do not depend on sharding."""
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from silc_bench import registry
from silc_bench.checkpoints import load_model
from silc_bench.data.classification import open_split
from silc_bench.data.fixtures_image_level import write_cifar100, write_imagefolder, write_karpathy
from silc_bench.data.prompts import canonicalize_text, get_templates
from silc_bench.errors import UserError
from silc_bench.harness import get_harness
from silc_bench.harness.fewshot import lsr_accuracy, shot_indices
from silc_bench.harness.retrieval import recall_at_k
from silc_bench.harness.zs_cls import class_texts
from silc_bench.results.record import read_record


def run_harness(task, model, dataset_name, root, overrides=None, shards=(None,)):
    harness = get_harness(registry.task_spec(task))
    ds = harness.open_dataset(dataset_name, root)
    protocol = harness.protocol_for(ds, overrides)
    prepared = harness.setup(model, ds, protocol, "cpu")
    n = len(ds)
    cut = [list(range(n))] if shards == (None,) else [list(range(i, min(i + shards, n))) for i in range(0, n, shards)]
    results = [harness.evaluate(model, ds, prepared, idx, device="cpu", batch_size=3) for idx in reversed(cut)]
    return harness.finalize(ds, harness.merge(results), prepared)[0], ds


# ---------------------------------------------------------------------- zero-shot classification
def test_class_texts_follow_big_vision():
    texts = class_texts([["class1", "class1a"], ["Aquarium_Fish"]], ["a {}.", "{}"], canonicalize=True,
                        first_name_only=False)
    assert texts == [["a class1", "class1", "a class1a", "class1a"], ["a aquarium fish", "aquarium fish"]]
    assert class_texts([["x", "y"]], ["{}"], canonicalize=False, first_name_only=True) == [["x"]]
    assert len(get_templates("clip_paper")) == 81 and get_templates("clip_paper")[-1] == "{}"


def test_zero_shot_accuracy_equals_a_hand_computation(tiny_big_vision_npz, tmp_path):
    write_cifar100(tmp_path, train_per_class=1, test_per_class=2, num_classes=100)
    model = load_model(str(tiny_big_vision_npz))
    metrics, ds = run_harness("zs-cls", model, "cifar100", tmp_path, shards=7)
    with torch.inference_mode():
        templates = [canonicalize_text(t, keep="{}") for t in get_templates("clip_paper")]
        weights = []
        for (name,) in ds.classnames:
            e = F.normalize(model.encode_text(model.tokenize([t.format(canonicalize_text(name)) for t in templates])), dim=-1)
            weights.append(F.normalize(e.mean(0), dim=0))
        weights = torch.stack(weights)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).float()
        pixels = F.interpolate(images, size=model.preprocess.image_size, mode="bilinear", align_corners=False) / 255.0
        scores = F.normalize(model.encode_image(model.preprocess.normalize(pixels)), dim=-1) @ weights.T
    labels = torch.tensor(ds.labels)
    assert metrics["top1"] == pytest.approx(100 * (scores.argmax(1) == labels).float().mean().item())
    top5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert metrics["top5"] == pytest.approx(100 * top5)


# ---------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("n,d", [(40, 6), (5, 12)])  # both of big_vision's branches (N >= D and D > N)
def test_least_squares_equals_numpy_ridge(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.integers(0, 4, n)
    xt, yt = rng.normal(size=(30, d)), rng.integers(0, 4, 30)
    mean, std = x.mean(0), x.std(0) + 1e-5
    X = np.hstack([(x - mean) / std, np.full((n, 1), 100.0)])
    Y = 2 * np.eye(4)[y] - 1
    w = np.linalg.solve(X.T @ X + 7.0 * np.eye(d + 1), X.T @ Y)
    Xt = np.hstack([(xt - mean) / std, np.full((30, 1), 100.0)])
    assert lsr_accuracy(x, y, xt, yt, 4, 7.0) == pytest.approx(np.mean((Xt @ w).argmax(1) == yt))


def test_fewshot_harness_equals_an_independent_solution(tiny_big_vision_npz, tmp_path):
    write_cifar100(tmp_path, train_per_class=3, test_per_class=1, num_classes=100)
    model = load_model(str(tiny_big_vision_npz))
    metrics, ds = run_harness("fewshot", model, "cifar100", tmp_path, shards=64)
    with torch.inference_mode():
        def feats(split):
            s = open_split(registry.dataset_entry("cifar100"), split, tmp_path)
            px = torch.stack([s[i]["image"] for i in range(len(s))]).float() / 255.0
            return model.encode_image_pre_logits(model.preprocess.normalize(px)).numpy(), np.array(s.labels)
        x_tr, y_tr = feats("train")
        x_te, y_te = feats("test")
    for shots in (1, 5):
        accs = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            take = np.concatenate([rng.permutation(np.where(y_tr == c)[0])[:shots] for c in range(100)])
            X = x_tr[take].astype(np.float64)
            mean, std = X.mean(0), X.std(0) + 1e-5
            A = np.hstack([(X - mean) / std, np.full((len(X), 1), 100.0)])
            Y = 2 * np.eye(100)[y_tr[take]] - 1
            w = A.T @ np.linalg.solve(A @ A.T + 1024.0 * np.eye(len(A)), Y)  # D > N: the dual form
            At = np.hstack([(x_te - mean) / std, np.full((len(x_te), 1), 100.0)])
            accs.append(100 * np.mean((At @ w).argmax(1) == y_te))
            assert metrics[f"top1_{shots}shot_seed{seed}"] == pytest.approx(accs[-1], abs=1e-9)
        assert metrics[f"top1_{shots}shot"] == pytest.approx(np.mean(accs))
    assert [len(o) for o in shot_indices(np.array([0, 1, 0, 1, 1]), 2, 0)] == [2, 3]


# ---------------------------------------------------------------------- retrieval
def brute_force_recall(images, texts, caption_image, k):
    sims = (images @ texts.T).numpy()
    i2t = np.mean([any(j in np.argsort(-sims[i], kind="stable")[:k] for j in np.where(caption_image == i)[0])
                   for i in range(len(images))])
    t2i = np.mean([caption_image[j] in np.argsort(-sims[:, j], kind="stable")[:k] for j in range(len(texts))])
    return 100 * i2t, 100 * t2i


def test_recall_equals_a_brute_force_ranking_ties_included():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(-2, 3, (9, 4), generator=g).float()  # integer embeddings: many exact ties
    texts = torch.randint(-2, 3, (27, 4), generator=g).float()
    caption_image = np.repeat(np.arange(9), 3)
    got = recall_at_k(images, texts, torch.tensor(caption_image), ks=(1, 2, 5))
    for k in (1, 2, 5):
        i2t, t2i = brute_force_recall(images, texts, caption_image, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t) and got[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_karpathy_reader_takes_the_test_split_in_both_layouts(tmp_path):
    for name in ("coco", "flickr30k"):
        write_karpathy(tmp_path, name, num_images=4, captions_per_image=5)
        harness = get_harness(registry.task_spec("retrieval"))
        ds = harness.open_dataset(name, tmp_path)
        assert len(ds) == 4 and len(ds.captions) == 20 and ds.caption_image[:6] == [0] * 5 + [1]
        assert ds[3]["image"].shape[0] == 3


# ---------------------------------------------------------------------- readers and bad input
def test_imagefolder_reader_sorts_class_folders(tmp_path):
    write_imagefolder(tmp_path / "ILSVRC2012" / "val", ["n02", "n01"], per_class=2)
    entry = dict(registry.dataset_entry("imagenet"), classnames="toyworld_things.txt", num_classes=24)
    with pytest.raises(UserError, match="2 class folders, 24 class names"):
        open_split(entry, "test", tmp_path)
    write_imagefolder(tmp_path / "tiny" / "val", [f"c{k:02d}" for k in range(24)], per_class=1)
    ds = open_split(dict(entry, root="tiny"), "test", tmp_path)
    assert ds.labels == list(range(24)) and ds[5]["label"] == 5


def test_cifar_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    root = write_cifar100(tmp_path, 1, 1, 100)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (root / "test").write_bytes(pickle.dumps({b"data": Evil(), b"fine_labels": [0]}))
    with pytest.raises(UserError, match="refusing to load"):
        open_split(registry.dataset_entry("cifar100"), "test", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_image_in_a_worker_gives_the_message_only(tiny_big_vision_npz, tmp_path):
    write_karpathy(tmp_path / "data", "coco", num_images=4)
    bad = tmp_path / "data/coco/val2014/COCO_val2014_000000000002.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    done = cli("retrieval", "coco", tiny_big_vision_npz, tmp_path / "data", tmp_path / "out", "--workers", "2")
    assert done.returncode == 2
    assert bad.name in done.stderr and "Traceback" not in done.stderr and "DataLoader worker" not in done.stderr


# ---------------------------------------------------------------------- corpus-level records
SAME_KEYS = ("metrics", "per_class", "protocol", "model", "dataset", "details", "task")


def cli(task, dataset, model, data_root, out, *extra, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "silc_bench.cli", "run", task, "--datasets", dataset, "--no-progress",
           "--model", str(model), "--data-root", str(data_root), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def only_record(out: Path, dataset: str) -> dict:
    (path,) = [p for p in Path(out).rglob(f"{dataset}.json") if "shards" not in p.parts]
    return read_record(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_retrieval_record_independent_of_shards_batches_and_processes(tiny_big_vision_npz, tmp_path):
    write_karpathy(tmp_path / "data", "coco", num_images=7)
    runs = {
        "one": ("--shard-size", "32", "--batch-size", "16", "--workers", "0"),
        "many": ("--shard-size", "2", "--batch-size", "1", "--workers", "0"),
    }
    records = {}
    for name, extra in runs.items():
        done = cli("retrieval", "coco", tiny_big_vision_npz, tmp_path / "data", tmp_path / name, *extra)
        assert done.returncode == 0, done.stderr
        records[name] = only_record(tmp_path / name, "coco")
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()))
    done = cli("retrieval", "coco", tiny_big_vision_npz, tmp_path / "data", tmp_path / "two", "--shard-size", "3",
               "--workers", "0", "--device", "cpu", launcher=torchrun)
    assert done.returncode == 0, done.stderr
    records["two"] = only_record(tmp_path / "two", "coco")
    assert records["two"]["timing"]["world_size"] == 2
    for name in ("many", "two"):
        for key in SAME_KEYS:
            assert records[name][key] == records["one"][key], (name, key)


def test_interrupted_fewshot_run_resumes_from_its_per_example_shards(tiny_big_vision_npz, tmp_path, monkeypatch):
    from silc_bench import runner
    from silc_bench.harness.fewshot import FewShotLinear

    write_cifar100(tmp_path / "data", train_per_class=2, test_per_class=1, num_classes=100)

    def opts(out):
        return runner.RunOptions(data_root=str(tmp_path / "data"), out_dir=out, shard_size=25, progress=False)

    spec = str(tiny_big_vision_npz)
    (uninterrupted,) = runner.run("fewshot", [spec], ["cifar100"], opts(tmp_path / "full"))
    real, calls = FewShotLinear.evaluate, []

    def dies_at_the_fifth_shard(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a kill would, between two atomic shard writes
        return real(self, *a, **k)

    monkeypatch.setattr(FewShotLinear, "evaluate", dies_at_the_fifth_shard)
    with pytest.raises(KeyboardInterrupt):
        runner.run("fewshot", [spec], ["cifar100"], opts(tmp_path / "resumed"))
    assert not list((tmp_path / "resumed").rglob("cifar100.json")), "no record from an interrupted run"
    monkeypatch.setattr(FewShotLinear, "evaluate", real)
    (resumed,) = runner.run("fewshot", [spec], ["cifar100"], opts(tmp_path / "resumed"))
    assert (resumed["_work"]["reused"], resumed["_work"]["computed"]) == (4, 8)  # 300 examples, 12 shards
    for key in SAME_KEYS:
        assert resumed[key] == uninterrupted[key], key
