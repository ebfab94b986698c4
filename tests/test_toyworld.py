"""Toy world: determinism, caption/label consistency, on-disk layouts, tokenizer, colour baseline."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from silc_bench.data import toyworld as tw
from silc_bench.errors import UserError

SPM_VERSION_OF_ASSET = "0.2.3"  # the sentencepiece that produced silc_bench/assets/toyworld_sp.model


def _same(a: tw.Scene, b: tw.Scene) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.instance_map, b.instance_map) and a.instances == b.instances
            and a.caption == b.caption)


def _mentioned(caption: str) -> set[int]:
    words = set(caption.replace(",", " ").split())
    return {k for k, n in enumerate(tw.CLASSES) if n in words or tw.plural(n) in words}


def _miou(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    """mmseg IoUMetric: dataset-level I/U per class, NaN (absent everywhere) ignored."""
    inter = np.bincount(gt[pred == gt], minlength=k)
    union = np.bincount(pred, minlength=k) + np.bincount(gt, minlength=k) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(inter / union))


# ---------------------------------------------------------------------------- the world
def test_class_lists():
    assert len(tw.CLASSES) == len(set(tw.CLASSES)) == tw.NUM_CLASSES == 30
    assert set(tw.UNSEEN_CLASSES) <= set(tw.THING_CLASSES) and len(tw.UNSEEN_CLASSES) == 6
    assert set(tw.SEEN_CLASSES) | set(tw.UNSEEN_CLASSES) == set(tw.CLASSES)
    # every unseen class shares its shape and its pattern with some seen class
    seen_styles = [tw.THING_STYLE[c] for c in tw.THING_CLASSES if c not in tw.UNSEEN_CLASSES]
    for c in tw.UNSEEN_CLASSES:
        shape, pattern = tw.THING_STYLE[c]
        assert any(s == shape for s, _ in seen_styles) and any(p == pattern for _, p in seen_styles)
    assert len(set(tw.THING_STYLE.values())) == len(tw.THING_CLASSES)  # (shape, pattern) is the class
    # world 2: (colour, pattern) is the class, and unseen classes share both with seen ones too
    assert len(set(tw.THING_STYLE_V2.values())) == len(tw.THING_CLASSES)
    seen_v2 = [tw.THING_STYLE_V2[c] for c in tw.THING_CLASSES if c not in tw.UNSEEN_CLASSES]
    for c in tw.UNSEEN_CLASSES:
        colour, pattern = tw.THING_STYLE_V2[c]
        assert any(s == colour for s, _ in seen_v2) and any(p == pattern for _, p in seen_v2)
    lines = tw.CLASSNAMES_FILE.read_text().splitlines()
    assert [ln.split(",")[0].strip() for ln in lines] == list(tw.CLASSES)


def test_determinism_and_streams():
    a = [tw.render(i, 7, 64) for i in range(6)]
    b = [tw.render(i, 7, 64) for i in reversed(range(6))][::-1]  # order must not matter
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not _same(tw.render(3, 7, 64), tw.render(3, 8, 64))
    assert not _same(tw.render(3, 7, 64), tw.render(4, 7, 64))
    # evaluation scenes come from another stream than pretraining, whatever the seeds
    assert not np.array_equal(tw.render(0, 0, 64, "validation").image, tw.render(0, 0, 64, "pretrain").image)
    with pytest.raises(ValueError):
        tw.render(0, 0, 64, "nonsense")


def test_world_versions():
    """World 1 is what the shipped toy checkpoints and the CI baseline were measured on: its scenes
    must not change (label maps and captions hashed, stable across numpy's float kernels)."""
    import hashlib

    def digest(world):
        h = hashlib.sha256()
        for i in range(4):
            for split, size in (("pretrain", 64), ("validation", 96)):
                s = tw.render(i, 0, size, split, world=world)
                h.update(s.labels.tobytes())
                h.update(s.caption.encode())
        return h.hexdigest()

    assert digest(1) == "eecc763309e1b7591fe5e31160a0f51e609ab51b3c1c650750bdbea4903172c0"
    assert tw.render(2, 0, 64).caption == tw.render(2, 0, 64, world=tw.DEFAULT_WORLD).caption
    assert not np.array_equal(tw.render(0, 0, 64, world=2).image, tw.render(0, 0, 64, world=1).image)
    with pytest.raises(UserError, match="world version"):
        tw.render(0, 0, 64, world=4)
    assert tw.PretrainDataset(seed=0, length=4, world=2)[1]["caption"] == tw.render(1, 0, 64, world=2).caption
    # world 3 is world 2 with larger objects: the same classes and captions' rules, more thing pixels
    share = {w: np.mean([(tw.render(i, 0, 96, "validation", world=w).labels >= len(tw.STUFF_CLASSES)).mean()
                         for i in range(60)]) for w in (2, 3)}
    assert 0.1 < share[2] < 0.2 and 0.28 < share[3] < 0.42, share


def test_background_mention_changes_captions_only():
    """`background_mention_p` (pretraining data option) rewrites captions; scenes stay world 2's, so
    models trained with it are evaluated on the same toyworld_v2 split."""
    named = {0: 0, 1: 0}
    for i in range(40):
        base = tw.render(i, 0, 64, world=2)
        for p in (0.0, 1.0):
            scene = tw.render(i, 0, 64, world=2, background_mention_p=p)
            assert np.array_equal(scene.image, base.image) and np.array_equal(scene.labels, base.labels)
            stuff = {tw.CLASSES[k] for k in np.unique(scene.labels) if k < len(tw.STUFF_CLASSES)}
            named[int(p)] += all(word in scene.caption for word in stuff)
            assert p or not any(word in scene.caption for word in stuff)
    assert named == {0: 0, 1: 40}


@pytest.mark.parametrize("option,world,value", [("background_mention_p", 2, 1.0), ("thing_mention_p", 3, 0.5)])
def test_caption_rate_options_are_checked_and_reach_the_pretraining_data(option, world, value):
    """A recipe's caption option reaches the dataset; a bad one names the option and the recipe."""
    from silc_bench.pretrain.trainer import make_dataset

    for bad in (1.5, -0.5, "half", True):
        with pytest.raises(UserError, match=option):
            tw.PretrainDataset(seed=0, length=4, world=world, **{option: bad})
    data = {"kind": "toyworld", "length": 4, "world": world, option: value}
    with pytest.raises(UserError, match=option + r"[\s\S]*file: recipe.yaml"):
        make_dataset({"data": dict(data, **{option: -0.5}), "_config_path": "recipe.yaml"})
    captions = [make_dataset({"data": data})[i]["caption"] for i in range(4)]
    assert captions == [tw.render(i, 0, 64, world=world, **{option: value}).caption for i in range(4)]
    assert captions != [tw.render(i, 0, 64, world=world).caption for i in range(4)]  # the option did something
    assert make_dataset({"data": dict(data, **{option: None})})[2]["caption"] == tw.render(2, 0, 64, world=world).caption


def test_thing_mention_names_a_subset_of_the_things_and_changes_captions_only():
    """`thing_mention_p` (pretraining data option): each thing class present is named with that
    chance, at least one always is, and images and labels are those of the world's own scenes."""
    def named_things(caption: str) -> set[int]:
        return {k for k in _mentioned(caption) if k >= len(tw.STUFF_CLASSES)}

    kept, present = {0.0: 0, 0.5: 0}, 0
    for i in range(60):
        base = tw.render(i, 0, 64, world=3, background_mention_p=1.0)
        things = {inst.class_id for inst in base.instances}
        assert named_things(base.caption) == things  # the world's own rule names every thing
        present += len(things)
        assert tw.render(i, 0, 64, world=3, background_mention_p=1.0, thing_mention_p=1.0).caption == base.caption
        for p in kept:
            scene = tw.render(i, 0, 64, world=3, background_mention_p=1.0, thing_mention_p=p)
            assert np.array_equal(scene.image, base.image) and np.array_equal(scene.labels, base.labels)
            named = named_things(scene.caption)
            assert named and named <= things, (p, scene.caption)
            assert p or len(named) == 1
            kept[p] += len(named)
            stuff = {k for k in np.unique(scene.labels) if k < len(tw.STUFF_CLASSES)}
            assert stuff <= _mentioned(scene.caption)
    assert kept[0.0] == 60 and 0.5 * present < kept[0.5] < 0.8 * present, (kept, present)


@pytest.mark.parametrize("size,world", [(64, 1), (96, 1), (64, 2), (96, 2), (64, 3), (96, 3)])
def test_labels_instances_captions_agree(size, world):
    nst = len(tw.STUFF_CLASSES)
    n_objects, stuff_named = [], []
    for i in range(150):
        s = tw.render(i, 1, size, world=world)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.labels.shape == (size, size) and s.labels.max() < tw.NUM_CLASSES
        on_stuff = s.instance_map < 0
        assert (s.labels[on_stuff] < nst).all() and (s.labels[~on_stuff] >= nst).all()
        assert 1 <= len(s.instances)
        n_objects.append(len(s.instances))
        for j, inst in enumerate(s.instances):
            mask = s.instance_map == j
            assert mask.sum() == inst.area >= 20
            assert (s.labels[mask] == inst.class_id).all()
            ys, xs = np.nonzero(mask)
            assert inst.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        present = set(s.classes)
        assert {inst.class_id for inst in s.instances} == {k for k in present if k >= nst}
        named = _mentioned(s.caption)
        if world == 1:  # every class present is named
            assert named == present, (s.caption, [tw.CLASSES[k] for k in present])
        else:  # every thing; the background all or not at all
            stuff = {k for k in present if k < nst}
            assert named - stuff == present - stuff and named & stuff in (set(), stuff), s.caption
            stuff_named.append(bool(named & stuff))
        if world >= 2:  # the thing's colour is its class's
            for inst in s.instances:
                assert inst.colour == tw.THING_STYLE_V2[tw.CLASSES[inst.class_id]][0]
    if size == 64:
        assert max(n_objects) == tw.WORLDS[world].objects_per_64px
    if world >= 2:
        assert 0.2 < np.mean(stuff_named) < 0.4  # named 30% of the time


def test_render_is_fast():
    for i in range(5):
        tw.render(i, 0, 64)
    t = time.perf_counter()
    for i in range(100):
        tw.render(i, 0, 64)
    ms = (time.perf_counter() - t) * 10
    assert ms < 10, f"{ms:.2f} ms per 64x64 scene (measured ~1.6 ms unloaded)"


def test_pretrain_dataset():
    import torch

    ds = tw.PretrainDataset(seed=5, length=10)
    assert len(ds) == 10
    item = ds[3]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    scene = tw.render(3, 5, 64)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), scene.image) and item["caption"] == scene.caption
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        ds[10]


# ---------------------------------------------------------------------------- on disk
def test_ade_layout_round_trip(tmp_path):
    root = tmp_path / "toyworld"
    base = tw.write_eval_split(root, num_images=5, size=96, seed=3)
    assert base == root / "ADEChallengeData2016"
    jpgs = sorted((base / "images" / "validation").glob("*.jpg"))
    pngs = sorted((base / "annotations" / "validation").glob("*.png"))
    assert len(jpgs) == len(pngs) == 5 and [p.stem for p in jpgs] == [p.stem for p in pngs]
    for i, (jp, pp) in enumerate(zip(jpgs, pngs)):
        scene = tw.render(i, 3, 96, "validation")
        lab = np.array(Image.open(pp))
        assert lab.dtype == np.uint8 and np.array_equal(lab, scene.labels + 1)  # ADE: class k stored as k + 1
        img = np.array(Image.open(jp))
        assert img.shape == (96, 96, 3) and np.abs(img.astype(int) - scene.image).mean() < 4  # JPEG q95 4:4:4
    # idempotent: same parameters -> nothing rewritten; other parameters -> refused unless overwrite
    mtimes = [os.stat(p).st_mtime_ns for p in jpgs]
    tw.write_eval_split(root, num_images=5, size=96, seed=3)
    assert mtimes == [os.stat(p).st_mtime_ns for p in jpgs]
    with pytest.raises(UserError):
        tw.write_eval_split(root, num_images=3, size=96, seed=3)
    tw.write_eval_split(root, num_images=3, size=96, seed=3, overwrite=True)
    assert len(list((base / "images" / "validation").glob("*.jpg"))) == 3
    assert len(list((base / "annotations" / "validation").glob("*.png"))) == 3
    assert json.loads((base / "toyworld_validation.json").read_text())["num_images"] == 3
    # another world version is another split: refused over this one, recorded in its manifest
    with pytest.raises(UserError):
        tw.write_eval_split(root, num_images=3, size=96, seed=3, world=2)
    base2 = tw.write_eval_split(tmp_path / "v2", num_images=2, size=96, seed=3, world=2)
    assert json.loads((base2 / "toyworld_validation.json").read_text())["world_version"] == 2
    lab = np.array(Image.open(base2 / "annotations" / "validation" / "toyworld_validation_000001.png"))
    assert np.array_equal(lab, tw.render(1, 3, 96, "validation", world=2).labels + 1)


def test_ade_split_through_the_segmentation_reader(tmp_path):
    seg = pytest.importorskip("silc_bench.data.segmentation")
    tw.write_eval_split(tmp_path / "toyworld", num_images=3, size=96, seed=0)
    entry = dict(tw.TOYWORLD_DATASET_ENTRY, name="toyworld", num_images=3)
    ds = seg.dataset_from_entry(entry, data_root=tmp_path)
    assert len(ds) == 3 and [c[0] for c in ds.classnames] == list(tw.CLASSES)
    for i in range(3):
        assert np.array_equal(ds[i]["label"].numpy(), tw.render(i, 0, 96, "validation").labels)


def _rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos = 0
    for j, n in enumerate(rle["counts"]):
        flat[pos:pos + n] = j % 2 == 1
        pos += n
    assert pos == h * w
    return flat.reshape(w, h).T


def test_detection_split(tmp_path):
    path = tw.write_detection_split(tmp_path / "coco", "val", num_images=4, size=96, seed=0)
    coco = json.loads(path.read_text())
    assert [c["name"] for c in coco["categories"]] == list(tw.THING_CLASSES)
    assert len(coco["images"]) == 4
    nst = len(tw.STUFF_CLASSES)
    for img in coco["images"]:
        assert (path.parent.parent / "images" / "val" / img["file_name"]).is_file()
        scene = tw.render(img["id"] - 1, 0, 96, "validation")  # the very scenes of the ADE split
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert len(anns) == len(scene.instances)
        for a, inst in zip(anns, scene.instances):
            x1, y1, x2, y2 = inst.box
            assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1] and a["category_id"] == inst.class_id - nst + 1
            mask = _rle_decode(a["segmentation"])
            assert mask.sum() == a["area"] == inst.area and (mask == (scene.instance_map == anns.index(a))).all()
    assert tw.write_detection_split(tmp_path / "coco", "val", num_images=4, size=96, seed=0) == path


# ---------------------------------------------------------------------------- tokenizer
def test_committed_tokenizer_encodes_every_class():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tw.TOKENIZER_FILE))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == tw.TOKENIZER_VOCAB_SIZE
    for name in tw.CLASSES:
        ids = sp.encode(name)
        assert len(ids) == 1 and sp.unk_id() not in ids and sp.decode(ids) == name, name
    caption = tw.render(0, 0, 64).caption
    assert sp.unk_id() not in sp.encode(caption) and sp.decode(sp.encode(caption)) == caption


def test_tokenizer_training_is_reproducible(tmp_path):
    import sentencepiece as spm

    out = tw.train_toy_tokenizer(tmp_path / "a" / "toyworld_sp")
    if spm.__version__ != SPM_VERSION_OF_ASSET:
        again = tw.train_toy_tokenizer(tmp_path / "b" / "other_name")
        assert out.read_bytes() == again.read_bytes()
        pytest.skip(f"sentencepiece {spm.__version__} != {SPM_VERSION_OF_ASSET}: checked run-to-run only")
    assert out.read_bytes() == tw.TOKENIZER_FILE.read_bytes()


# ---------------------------------------------------------------------------- difficulty
def test_colour_alone_does_not_segment():
    """Per-pixel colour classifiers fitted on a training split stay near chance on validation."""
    k = tw.NUM_CLASSES
    train = [tw.render(i, 0, 64, "train") for i in range(120)]
    val = [tw.render(i, 0, 96, "validation") for i in range(40)]
    x = np.concatenate([s.image.reshape(-1, 3) for s in train]).astype(np.float32)
    y = np.concatenate([s.labels.ravel() for s in train]).astype(np.int64)
    xv = np.concatenate([s.image.reshape(-1, 3) for s in val]).astype(np.float32)
    yv = np.concatenate([s.labels.ravel() for s in val]).astype(np.int64)
    proto = np.stack([x[y == c].mean(0) for c in range(k)])
    d = (xv ** 2).sum(1, keepdims=True) - 2 * xv @ proto.T + (proto ** 2).sum(1)
    proto_miou = _miou(d.argmin(1), yv, k)
    # the best colour-only rule: majority class per 16^3 colour bin
    q = lambda im: ((im.astype(np.int64) // 16) * np.array([256, 16, 1])).sum(1)
    hist = np.zeros((16 ** 3, k))
    np.add.at(hist, (q(x), y), 1)
    hist_miou = _miou(hist.argmax(1)[q(xv)], yv, k)
    print(f"colour prototype mIoU {proto_miou:.4f}, colour histogram mIoU {hist_miou:.4f}")
    assert proto_miou < 0.08 and hist_miou < 0.08


def test_world_2_colour_finds_stuff_but_not_things():
    """World 2 gives each class its colours, as the real world does: a per-pixel colour rule fitted
    on labels segments stuff (measured 72% IoU) but not things (9%), which share colours in fours
    and differ by pattern."""
    k, nst = tw.NUM_CLASSES, len(tw.STUFF_CLASSES)
    train = [tw.render(i, 0, 64, "train", world=2) for i in range(120)]
    val = [tw.render(i, 0, 96, "validation", world=2) for i in range(40)]
    x = np.concatenate([s.image.reshape(-1, 3) for s in train])
    y = np.concatenate([s.labels.ravel() for s in train]).astype(np.int64)
    xv = np.concatenate([s.image.reshape(-1, 3) for s in val])
    yv = np.concatenate([s.labels.ravel() for s in val]).astype(np.int64)
    q = lambda im: ((im.astype(np.int64) // 16) * np.array([256, 16, 1])).sum(1)
    hist = np.zeros((16 ** 3, k))
    np.add.at(hist, (q(x), y), 1)
    pred = hist.argmax(1)[q(xv)]
    inter = np.bincount(yv[pred == yv], minlength=k)
    union = np.bincount(pred, minlength=k) + np.bincount(yv, minlength=k) - inter
    iou = inter / np.maximum(union, 1)
    assert iou[:nst].mean() > 0.5 and iou[nst:].mean() < 0.15, (iou[:nst].mean(), iou[nst:].mean())


# ---------------------------------------------------------------------------- image-level splits
def test_image_level_splits_of_each_world(tmp_path, monkeypatch):
    """`toyworld_cls` / `toyworld_captions` and their world-2 twins are written under their own
    roots, from their own world, on first use."""
    from silc_bench import registry
    from silc_bench.data import toy_image_level as til

    monkeypatch.setattr(til, "CLS_COUNTS", {"train": 3, "val": 4})
    monkeypatch.setattr(til, "CAPTION_IMAGES", 3)
    for name, world in (("toyworld_cls", 1), ("toyworld_v2_cls", 2)):
        entry = dict(registry.dataset_entry(name), name=name)
        til.ensure(entry, tmp_path)
        out = tmp_path / entry["root"]
        assert json.loads((out / "manifest.json").read_text())["world"] == world
        files = sorted(out.glob("val/*/*.png"))
        assert len(files) == 4
        for f in files:
            image, cls = til.single_object_scene(int(f.stem), "validation", 0, world)
            assert f.parent.name == cls and np.array_equal(np.array(Image.open(f)), image)
    for name, world in (("toyworld_captions", 1), ("toyworld_v2_captions", 2)):
        entry = dict(registry.dataset_entry(name), name=name)
        til.ensure(entry, tmp_path)
        data = json.loads((tmp_path / entry["root"] / entry["annotations"]).read_text())
        scene = tw.render(2, 0, til.SIZE, "validation", world=world)
        sentences = [s["raw"] for s in data["images"][2]["sentences"]]
        assert len(sentences) == til.CAPTIONS_PER_IMAGE and sentences[0] == scene.caption
        assert all(_mentioned(c) >= {i.class_id for i in scene.instances} for c in sentences)


@pytest.mark.parametrize("world", [1, 2])
def test_question_splits_answer_from_the_scene(tmp_path, world):
    """Every generated answer is recomputed here from the scene's instances, in both layouts."""
    from silc_bench.data import toy_vqa

    root = toy_vqa.write_vqa(tmp_path, world=world, num_images=25)
    qs = json.loads((root / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in
            json.loads((root / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]}
    gqa = json.loads((root / "gqa" / "testdev_balanced_questions.json").read_text())
    assert len(qs) == len(anns) == len(gqa) >= 25 * 3
    kinds = set()
    for q in qs:
        a = anns[q["question_id"]]
        answer = a["multiple_choice_answer"]
        assert [x["answer"] for x in a["answers"]] == [answer] * 10
        assert gqa[str(q["question_id"])]["answer"] == answer and gqa[str(q["question_id"])]["question"] == q["question"]
        scene = tw.render(q["image_id"] - 1, 0, toy_vqa.SIZE, "validation", world=world)
        img = np.array(Image.open(root / "vqa" / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg"))
        assert np.abs(img.astype(int) - scene.image).mean() < 4
        names = [tw.CLASSES[i.class_id] for i in scene.instances]
        words = q["question"].rstrip("?").split()
        kinds.add(a["question_type"])
        if words[:2] == ["how", "many"]:
            thing = [n for n in tw.THING_CLASSES if tw.plural(n) == words[2]]
            shape = [s for s in tw.SHAPES if tw.plural(s) == words[2]]
            expected = names.count(thing[0]) if thing else sum(i.shape == shape[0] for i in scene.instances)
            assert answer == str(expected)
        elif words[:2] == ["is", "there"]:
            assert answer == ("yes" if words[3] in names else "no")
        elif words[:2] == ["what", "colour"]:
            assert names.count(words[4]) == 1 and answer == scene.instances[names.index(words[4])].colour
        else:
            assert words[:4] == ["what", "is", "left", "of"]
            inst = scene.instances[names.index(words[5])]
            left = [tw.CLASSES[j.class_id] for j in scene.instances if j is not inst and j.box[2] <= inst.box[0]]
            assert left == [answer]
    assert kinds == {"count", "exist", "colour", "relation"}
    assert toy_vqa.write_vqa(tmp_path, world=world, num_images=25) == root  # written once


def test_world_naming_rule():
    """Experiments find a world's split and recipes by these names; the registry follows them
    (tests/test_toy_checkpoints.py)."""
    assert [tw.dataset_name(w) for w in (1, 2, 3)] == ["toyworld", "toyworld_v2", "toyworld_v3"]
    assert [tw.recipe_suffix(w) for w in (1, 2, "3")] == ["", "_w2", "_w3"]
    for bad in (9, 2.9, "2.0", "x"):
        with pytest.raises(UserError, match="unknown toy world version"):
            tw.dataset_name(bad)
