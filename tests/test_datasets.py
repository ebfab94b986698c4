"""Segmentation readers on fixtures in the real on-disk layouts; class names; prompt templates."""
from __future__ import annotations

import importlib.util
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from silc_bench import paths, registry
from silc_bench.data import fixtures
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.data.prompts import TEMPLATE_SETS, get_templates, prompt_set_hash
from silc_bench.data.segmentation import (CLASSNAMES_DIR, DatasetSizeWarning, dataset_from_entry, load_classnames,
                                          open_dataset)
from silc_bench.errors import UserError

DATASETS = ["ade150", "pc59", "cityscapes", "voc20", "cocostuff171"]
COUNTS = {"ade150": 150, "pc59": 59, "cityscapes": 19, "voc20": 20, "cocostuff171": 171}
SIZE = (24, 32)
N = 3

# The real layouts, written out independently of configs/datasets.yaml:
# (dataset folder, image path -> label path, how stored label values map to training ids)
LAYOUT = {
    "ade150": ("ADEChallengeData2016",
               lambda p: p.replace("/images/validation/", "/annotations/validation/").replace(".jpg", ".png"), "reduce"),
    "pc59": ("VOCdevkit/VOC2010",
             lambda p: p.replace("/JPEGImages/", "/SegmentationClassContext/").replace(".jpg", ".png"), "reduce"),
    "cityscapes": ("cityscapes",
                   lambda p: p.replace("/leftImg8bit/val/", "/gtFine/val/").replace(
                       "_leftImg8bit.png", "_gtFine_labelTrainIds.png"), "identity"),
    "voc20": ("VOCdevkit/VOC2012",
              lambda p: p.replace("/JPEGImages/", "/SegmentationClass/").replace(".jpg", ".png"), "reduce"),
    "cocostuff171": ("coco_stuff164k",
                     lambda p: p.replace("/images/val2017/", "/annotations/val2017/").replace(
                         ".jpg", "_labelTrainIds.png"), "identity"),
}
SPLIT_FILES = {"pc59": "ImageSets/SegmentationContext/val.txt", "voc20": "ImageSets/Segmentation/val.txt"}


def expected_label(raw: np.ndarray, mapping: str) -> np.ndarray:
    raw = raw.astype(np.int64)
    if mapping == "identity":
        return raw
    out = raw - 1  # mmseg reduce_zero_label: 0 -> 255, v -> v - 1, 255 stays 255
    out[raw == 0] = 255
    out[raw == 255] = 255
    return out


def _open(name, root, **kw):
    with pytest.warns(DatasetSizeWarning):  # a fixture is never the full split
        return open_dataset(name, root, **kw)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_data")
    for name in DATASETS:
        write_segmentation_fixture(name, root, num_images=N, size=SIZE, seed=7)
    return root


def _fresh(tmp_path, name, **kw):
    write_segmentation_fixture(name, tmp_path, num_images=kw.pop("num_images", 2), size=SIZE, seed=1)
    return tmp_path / LAYOUT[name][0]


# ---------------------------------------------------------------------- reading each layout back
@pytest.mark.parametrize("name", DATASETS)
def test_fixture_reads_back(name, fixture_root):
    folder, to_label, mapping = LAYOUT[name]
    ds = _open(name, fixture_root)
    assert ds.name == name and ds.num_classes == COUNTS[name] and len(ds.classnames) == COUNTS[name]
    assert ds.ignore_index == 255 and ds.spec["num_classes"] == COUNTS[name]
    assert len(ds) == N  # the split's images only: training / unlabelled distractors are not read
    root = fixture_root / folder
    for s in ds.samples:
        assert Path(s.image).is_relative_to(root)
        assert str(s.label) == to_label(str(s.image)), "image and label paired by the real naming"
    if name in SPLIT_FILES:
        listed = (root / SPLIT_FILES[name]).read_text().split()
        assert [s.name for s in ds.samples] == sorted(listed)
    assert [s.name for s in ds.samples] == sorted(s.name for s in ds.samples)

    # regenerate what the fixture drew, to check encode (fixture) + decode (reader) end to end
    truth = fixtures.draw_samples(name, N, SIZE, seed=7)
    for i, s in enumerate(ds.samples):
        item = ds[i]
        assert set(item) == {"image", "label", "name", "index"} and item["index"] == i and item["name"] == s.name
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, *SIZE)
        assert item["label"].dtype == torch.int64 and item["label"].shape == SIZE
        rgb = np.asarray(Image.open(s.image).convert("RGB"))
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), rgb)
        raw = np.asarray(Image.open(s.label))
        label = item["label"].numpy()
        assert np.array_equal(label, expected_label(raw, mapping))
        assert ((label < COUNTS[name]) | (label == 255)).all()
        # the fixture's i-th drawn sample is the i-th in sorted order for every layout
        want = truth[i][1].astype(np.int64)
        if name == "voc20":  # VOC outlines objects with 255; compare off the outlines
            keep = raw != 255
            assert np.array_equal(label[keep], want[keep]) and (~keep).any()
        else:
            assert np.array_equal(label, want)
        if mapping == "reduce":
            assert (raw == 0).any() and (label[raw == 0] == 255).all()


@pytest.mark.parametrize("name", DATASETS)
def test_limit_pickle_and_spec(name, fixture_root):
    ds = open_dataset(name, fixture_root, limit=2)  # with a limit the size warning is off
    assert [s.name for s in ds.samples] == [s.name for s in _open(name, fixture_root).samples[:2]]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["label"], ds[1]["label"]) and clone.classnames == ds.classnames


def test_dataloader_workers(fixture_root):
    ds = open_dataset("ade150", fixture_root, limit=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    items = list(loader)
    assert [it["name"] for it in items] == [s.name for s in ds.samples]
    assert torch.equal(items[0]["label"], ds[0]["label"])


def test_data_root_from_environment(fixture_root, monkeypatch):
    monkeypatch.setenv(paths.DATA_ENV, str(fixture_root))
    assert len(open_dataset("cityscapes", limit=1)) == 1


def test_entry_dict_with_own_classnames_and_protocol(fixture_root, tmp_path):
    classes = tmp_path / "toy.txt"
    classes.write_text("".join(f"thing {i}, object {i}\n" for i in range(150)))
    entry = {"name": "toyworld", "layout": "glob", "root": "ADEChallengeData2016",
             "images": "images/validation/*.jpg", "labels": "annotations/validation/*.png",
             "classnames_path": str(classes), "num_classes": 150, "reduce_zero_label": True,
             "protocol": {"crop": 64, "stride": 32}}
    ds = dataset_from_entry(entry, fixture_root)
    assert ds.name == "toyworld" and ds.spec["protocol"] == {"crop": 64, "stride": 32}
    assert ds.classnames[3] == ["thing 3", "object 3"] and len(ds) == N
    # a relative classnames_path is relative to the project dir
    rel = dict(entry, classnames_path="silc_bench/data/classnames/ade150.txt")
    assert dataset_from_entry(rel, fixture_root).classnames[0] == ["wall"]
    # a class file whose length disagrees with num_classes is refused, naming the file
    classes.write_text("a\nb\n")
    with pytest.raises(UserError, match=re.escape(str(classes))):
        dataset_from_entry(entry, fixture_root)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", DATASETS)
def test_missing_dataset_folder(name, tmp_path):
    with pytest.raises(UserError) as e:
        open_dataset(name, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / LAYOUT[name][0]) in msg and repr(name) in msg
    assert "--data-root" in msg and "SILC_BENCH_DATA" in msg and "preparation" in msg


@pytest.mark.parametrize("name", DATASETS)
def test_image_without_label(name, tmp_path):
    root = _fresh(tmp_path, name)
    ds = _open(name, tmp_path)
    victim = ds.samples[1]
    victim.label.unlink()
    with pytest.raises(UserError) as e:
        open_dataset(name, tmp_path)
    msg = str(e.value)
    assert str(victim.label) in msg, msg  # the label expected (split layouts) or the image (glob layouts)...
    if LAYOUT[name][0] in ("ADEChallengeData2016", "cityscapes", "coco_stuff164k"):
        assert str(victim.image) in msg
    assert root.is_dir()


@pytest.mark.parametrize("name", ["ade150", "cityscapes", "cocostuff171"])
def test_label_without_image(name, tmp_path):
    _fresh(tmp_path, name)
    victim = _open(name, tmp_path).samples[0]
    victim.image.unlink()
    with pytest.raises(UserError, match=re.escape(str(victim.label))):
        open_dataset(name, tmp_path)


@pytest.mark.parametrize("name", ["pc59", "voc20"])
def test_missing_split_file_and_listed_image(name, tmp_path):
    root = _fresh(tmp_path, name)
    victim = _open(name, tmp_path).samples[0]
    victim.image.unlink()
    with pytest.raises(UserError, match=re.escape(str(victim.image))):
        open_dataset(name, tmp_path)
    (root / SPLIT_FILES[name]).unlink()
    with pytest.raises(UserError, match=re.escape(str(root / SPLIT_FILES[name]))):
        open_dataset(name, tmp_path)


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("what", ["image", "label"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file(name, what, damage, tmp_path):
    _fresh(tmp_path, name)
    ds = _open(name, tmp_path)
    path = getattr(ds.samples[0], what)
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        ds[0]
    assert str(path) in str(e.value) and f"cannot read {what}" in str(e.value)
    ds[1]  # the others still read


@pytest.mark.parametrize("name,raw_value,bad", [
    ("ade150", 200, 199), ("pc59", 61, 60), ("voc20", 22, 21), ("cityscapes", 19, 19), ("cocostuff171", 180, 180),
])
def test_label_value_out_of_range(name, raw_value, bad, tmp_path):
    _fresh(tmp_path, name)
    ds = _open(name, tmp_path)
    path = ds.samples[1].label
    with Image.open(path) as im:
        raw, mode, palette = np.array(im), im.mode, im.getpalette()
    raw[2:4, 3:6] = raw_value
    out = Image.fromarray(raw, mode)
    if mode == "P":
        out.putpalette(palette)
    out.save(path)
    with pytest.raises(UserError) as e:
        ds[1]
    msg = str(e.value)
    assert str(path) in msg and re.search(rf"\b{bad}\b", msg) and "fix:" in msg


def test_rgb_label_and_size_mismatch(tmp_path):
    _fresh(tmp_path, "cityscapes")
    ds = _open("cityscapes", tmp_path)
    lbl = ds.samples[0].label
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(lbl)
    with pytest.raises(UserError, match=re.escape(str(lbl))):
        ds[0]
    lbl = ds.samples[1].label
    Image.fromarray(np.zeros((SIZE[0] + 1, SIZE[1]), np.uint8)).save(lbl)
    with pytest.raises(UserError, match=re.escape(str(lbl))):
        ds[1]


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UserError, match="ade150"):
        open_dataset("ade151", tmp_path)


# ---------------------------------------------------------------------- configs/datasets.yaml
def test_yaml_entries_are_complete():
    entries = yaml.safe_load((paths.CONFIGS_DIR / "datasets.yaml").read_text())
    assert set(DATASETS) <= set(entries)
    for name in DATASETS:
        e = entries[name]
        for key in ("layout", "root", "split", "images", "labels", "classnames", "num_classes", "reduce_zero_label",
                    "ignore_index", "num_images", "prepare", "classes_source"):
            assert key in e, (name, key)
        assert e["num_classes"] == COUNTS[name] and e["ignore_index"] == 255
        assert e["root"] == LAYOUT[name][0]
        assert e["reduce_zero_label"] == (LAYOUT[name][2] == "reduce")
        assert len(load_classnames(CLASSNAMES_DIR / e["classnames"])) == COUNTS[name]
    assert {n: entries[n]["num_images"] for n in DATASETS} == {
        "ade150": 2000, "pc59": 5105, "cityscapes": 500, "voc20": 1449, "cocostuff171": 5000}


# ---------------------------------------------------------------------- class names
# Vendored copies of CAT-Seg's datasets/*.json and SCLIP's configs/cls_*.txt (see its README.md).
REF = Path(__file__).resolve().parent / "fixtures" / "reference_classnames"
REF_FILES = {  # ours -> (CAT-Seg json, SCLIP txt)
    "ade150": ("ade150.json", "cls_ade20k.txt"), "pc59": ("pc59.json", "cls_context59.txt"),
    "voc20": ("voc20.json", "cls_voc20.txt"), "cocostuff171": ("coco.json", "cls_coco_stuff.txt"),
    "cityscapes": (None, "cls_city_scapes.txt"),
}


def _norm(s: str) -> str:
    return re.sub(r"[\s\-_]", "", s.lower())


@pytest.mark.parametrize("name", DATASETS)
def test_classname_files_format(name):
    path = CLASSNAMES_DIR / f"{name}.txt"
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n")
    classes = load_classnames(path)
    assert len(classes) == COUNTS[name]
    for syns in classes:
        assert all(s == s.strip() and s for s in syns) and len(set(syns)) == len(syns)
    firsts = [c[0] for c in classes]
    assert len(set(firsts)) == len(firsts), "first names are unique"


@pytest.mark.parametrize("name", DATASETS)
def test_classnames_match_references(name):
    ours = load_classnames(CLASSNAMES_DIR / f"{name}.txt")
    catseg_file, sclip_file = REF_FILES[name]
    sclip = [[s.strip() for s in line.split(",")] for line in (REF / "sclip" / sclip_file).read_text().split("\n")]
    assert len(sclip) == len(ours)
    refs = [sclip]
    if catseg_file:
        catseg = [[s.strip() for s in c.split(",")] for c in json.loads((REF / "catseg" / catseg_file).read_text())]
        assert len(catseg) == len(ours)
        refs.append(catseg)
    for i, syns in enumerate(ours):
        mine = {_norm(s) for s in syns}
        for ref in refs:  # same class at the same index: some spelling in common
            assert mine & {_norm(s) for s in ref[i]}, (name, i, syns, ref[i])
        # no glued multi-word names: when a reference spells a name with a space, we do too
        spaced = {s for ref in refs for s in ref[i] if " " in s}
        for s in spaced:
            if _norm(s) in mine:
                assert any(_norm(m) == _norm(s) and " " in m for m in syns), (name, i, syns)
    if name == "voc20":  # SCLIP's synonyms are kept
        assert "person in shirt" in ours[14] and "television" in ours[19]


def test_glued_names_are_spaced():
    text = {n: (CLASSNAMES_DIR / f"{n}.txt").read_text() for n in DATASETS}
    for glued in ("chestofdrawers", "pooltable", "pottedplant", "tvmonitor", "diningtable", "trafficlight",
                  "trafficsign", "swimmingpool", "firehydrant"):
        assert not any(glued in t for t in text.values()), glued
    assert "chest of drawers" in text["ade150"] and "traffic sign" in text["cityscapes"]


# ---------------------------------------------------------------------- prompts
def test_openai_templates_equal_open_clip():
    t = get_templates("openai_imagenet_80")
    assert len(t) == 80 and len(set(t)) == 80 and all(s.count("{}") == 1 for s in t)
    assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."
    # load open_clip's metadata file alone: importing the package pulls in torchvision and timm (~6 s)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
    if not path.is_file():
        pytest.skip(f"open_clip has no {path.name}")
    meta_spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
    meta = importlib.util.module_from_spec(meta_spec)
    meta_spec.loader.exec_module(meta)
    assert t == [f("{}") for f in meta.OPENAI_IMAGENET_TEMPLATES]


def test_tcl_and_single_templates():
    tcl = get_templates("tcl_9")
    assert len(tcl) == 9 and set(tcl) <= set(get_templates("openai_imagenet_80")) | {"a photo of {}s."}
    assert tcl[-2:] == ["a photo of many {}.", "a photo of {}s."]
    assert get_templates("a_photo_of") == ["a photo of a {}."]
    got = get_templates("tcl_9")
    got.append("x")  # callers get a copy
    assert len(get_templates("tcl_9")) == 9
    with pytest.raises(UserError, match="openai_imagenet_80"):
        get_templates("imagenet")


def test_prompt_set_hash():
    hashes = {prompt_set_hash(get_templates(n)) for n in TEMPLATE_SETS}
    assert len(hashes) == len(TEMPLATE_SETS) and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    t = get_templates("tcl_9")
    assert prompt_set_hash(t) == prompt_set_hash(list(t))
    assert prompt_set_hash(t) != prompt_set_hash(t[::-1])
    assert prompt_set_hash(["a {}."]) != prompt_set_hash(["a {} ."])


# ---------------------------------------------------------------------- CAT-Seg layouts (ov-seg)
# Written from CAT-Seg's datasets/prepare_*.py (6d3a188) independently of configs/datasets.yaml:
# (dataset folder, image path -> label path, stored value -> training id, full split size)
CATSEG_LAYOUT = {
    "ade847": ("ADE20K_2021_17_01", lambda p: p.replace("/images_detectron2/validation/", "/annotations_detectron2/validation/")
               .replace(".jpg", ".tif"), "identity", 2000),
    "pc459": ("VOCdevkit/VOC2010", lambda p: p.replace("/JPEGImages/", "/annotations_detectron2/pc459_val/")
              .replace(".jpg", ".tif"), "identity", 5104),
    "pc59_catseg": ("VOCdevkit/VOC2010", lambda p: p.replace("/JPEGImages/", "/annotations_detectron2/pc59_val/")
                    .replace(".jpg", ".png"), "identity", 5105),
    "pc59_catseg_mmseg": (*LAYOUT["pc59"], 5105),
    "voc20_catseg": (*LAYOUT["voc20"], 1449),
    "voc21": ("VOCdevkit/VOC2012", LAYOUT["voc20"][1], "identity", 1449),
    "cocostuff171_train": ("coco-stuff", lambda p: p.replace("/images/train2017/", "/annotations_detectron2/train2017/")
                           .replace(".jpg", ".png"), "identity", 118287),
    "cocostuff171_train_mmseg": ("coco_stuff164k", lambda p: p.replace("/images/train2017/", "/annotations/train2017/")
                                 .replace(".jpg", "_labelTrainIds.png"), "identity", 118287),
}
CATSEG_IGNORE = {"ade847": 65535, "pc459": 65535}
CATSEG_NAMES = {  # ours -> CAT-Seg json (exact spellings, synonyms kept)
    "ade847.txt": "ade847.json", "pc459.txt": "pc459.json", "pc59_catseg.txt": "pc59.json", "voc20_catseg.txt": "voc20.json",
    "voc20b_catseg.txt": "voc20b.json", "cocostuff171_catseg.txt": "coco.json", "ade150.txt": "ade150.json",
}


@pytest.fixture(scope="module")
def catseg_roots(tmp_path_factory):
    roots = {}
    for name in CATSEG_LAYOUT:  # one root each: several share VOC2010 / VOC2012
        roots[name] = tmp_path_factory.mktemp(name)
        write_segmentation_fixture(name, roots[name], num_images=N, size=SIZE, seed=11)
    return roots


@pytest.mark.parametrize("name", list(CATSEG_LAYOUT))
def test_catseg_layout_reads_back(name, catseg_roots):
    folder, to_label, mapping, full = CATSEG_LAYOUT[name]
    ignore = CATSEG_IGNORE.get(name, 255)
    ds = _open(name, catseg_roots[name])
    assert len(ds) == N and ds.ignore_index == ignore and ds.spec["num_images"] == full
    truth = fixtures.draw_samples(name, N, SIZE, seed=11)
    for i, s in enumerate(ds.samples):
        assert str(s.label) == to_label(str(s.image)) and s.image.is_relative_to(catseg_roots[name] / folder)
        raw = np.asarray(Image.open(s.label))
        if s.label.suffix == ".tif":
            assert raw.dtype == np.uint16 and Image.open(s.label).mode == "I;16"
        label = ds[i]["label"].numpy()
        assert np.array_equal(label, expected_label(raw, mapping) if ignore == 255 else raw.astype(np.int64))
        want = truth[i][1].astype(np.int64)
        keep = raw != 255 if name.startswith("voc") else np.ones(SIZE, bool)  # VOC object outlines
        assert np.array_equal(label[keep], want[keep])
        assert ((label < ds.num_classes) | (label == ignore)).all() and (label == ignore).any()


def test_catseg_yaml_entries_and_classnames():
    entries = yaml.safe_load((paths.CONFIGS_DIR / "datasets.yaml").read_text())
    for name, (folder, _, mapping, full) in CATSEG_LAYOUT.items():
        e = entries[name]
        assert e["root"] == folder and e["num_images"] == full and e["prepare"] and e["classes_source"]
        assert e["ignore_index"] == CATSEG_IGNORE.get(name, 255)
        assert e["num_classes"] == fixtures.NUM_CLASSES[name] == len(load_classnames(CLASSNAMES_DIR / e["classnames"]))
    assert entries["pc459"]["ignore_values"] == [459] and entries["pc459"]["keys_from"] == "labels"
    assert entries["voc21"]["query_to_label"] == list(range(1, 21)) + [0] * 39
    voc20b = load_classnames(CLASSNAMES_DIR / entries["voc21"]["query_classnames"])
    voc21 = load_classnames(CLASSNAMES_DIR / entries["voc21"]["classnames"])
    assert voc20b[:20] == voc21[1:] == load_classnames(CLASSNAMES_DIR / "voc20_catseg.txt") and voc21[0] == ["background"]
    for zs in DATASETS:  # the zs-seg entries are unchanged
        assert "keys_from" not in entries[zs] and "query_classnames" not in entries[zs]


@pytest.mark.parametrize("ours,ref", list(CATSEG_NAMES.items()))
def test_catseg_classnames_equal_catseg_json(ours, ref):
    text = (CLASSNAMES_DIR / ours).read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n")
    catseg = [[s.strip() for s in c.split(",")] for c in json.loads((REF / "catseg" / ref).read_text())]
    assert load_classnames(CLASSNAMES_DIR / ours) == catseg  # same count, order, spellings and synonyms


def test_catseg_layout_bad_input(tmp_path):
    with pytest.raises(UserError) as e:
        open_dataset("ade847", tmp_path)
    assert str(tmp_path / "ADE20K_2021_17_01") in str(e.value) and "prepare_ade20k_full.py" in str(e.value)
    write_segmentation_fixture("pc459", tmp_path, num_images=3, size=SIZE, seed=2)
    ds = _open("pc459", tmp_path)
    # CAT-Seg's registered ignore label 459 is ignored like the unlabelled 65535
    raw = np.asarray(Image.open(ds.samples[0].label)).copy()
    raw[0, :3] = 459
    Image.fromarray(raw).save(ds.samples[0].label)
    assert (ds[0]["label"][0, :3] == 65535).all()
    # a value past the classes (and not an ignore value) names the file
    raw[1, :2] = 460
    Image.fromarray(raw).save(ds.samples[0].label)
    with pytest.raises(UserError) as e:
        ds[0]
    assert str(ds.samples[0].label) in str(e.value) and re.search(r"\b460\b", str(e.value))
    # a truncated uint16 TIFF
    data = ds.samples[1].label.read_bytes()
    ds.samples[1].label.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=re.escape(str(ds.samples[1].label))):
        ds[1]
    # keys_from labels: a label whose image is missing names both
    ds.samples[2].image.unlink()
    with pytest.raises(UserError) as e:
        open_dataset("pc459", tmp_path)
    assert str(ds.samples[2].label) in str(e.value) and str(ds.samples[2].image) in str(e.value)
    entry = dict(registry.dataset_entry("pc459"), keys_from="images")
    with pytest.raises(UserError, match="keys_from"):
        dataset_from_entry(entry, tmp_path)


def test_sun397_release_layout(tmp_path):
    """SUN397 as released: class list, split lists of image paths, images under letter folders."""
    from silc_bench.data.classification import open_split, sun397_name

    root = tmp_path / "SUN397"
    classes = ["/a/abbey", "/b/bakery/shop", "/a/airport_terminal"]
    (root / "Partitions").mkdir(parents=True)
    (root / "Partitions" / "ClassName.txt").write_text("\n".join(classes) + "\n")
    test_list = []
    for k, c in enumerate(classes):
        folder = root / c.lstrip("/")
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * k + j, np.uint8)).save(folder / f"sun_{k}{j}.jpg")
            test_list.append(f"{c}/sun_{k}{j}.jpg")
    (root / "Partitions" / "Testing_01.txt").write_text("\n".join(test_list[::-1]) + "\n")
    (root / "Partitions" / "Training_01.txt").write_text(test_list[0] + "\n")
    ds = open_split(registry.dataset_entry("sun397"), "test", tmp_path)
    assert [n[0] for n in ds.classnames] == ["abbey", "bakery shop", "airport terminal"]
    assert len(ds) == 6 and ds.labels == [2, 2, 1, 1, 0, 0]
    assert ds[0]["image"].shape == (3, 8, 8) and ds[0]["label"] == 2
    assert sun397_name("/b/bakery/shop") == "bakery shop"
    (root / "Partitions" / "Testing_01.txt").write_text("/z/zoo/sun_1.jpg\n")
    with pytest.raises(UserError, match="no class"):
        open_split(registry.dataset_entry("sun397"), "test", tmp_path)
