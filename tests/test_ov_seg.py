"""The open-vocabulary (CAT-Seg) harness: records on every layout, hand-computed VOC-21 and PC-459
cases, and the sliding-window + global combination against a naive CAT-Seg-style reference."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from silc_bench import checkpoints, registry, runner
from silc_bench.data.fixtures import class_colour, write_pc459, write_segmentation_fixture
from silc_bench.errors import UserError
from silc_bench.harness import ov_seg

OV_SEG = ov_seg.OpenVocabSegmentation(registry.task_spec("ov-seg"))  # the harness, given its whole spec
from silc_bench.metrics.segmentation import SegmentationMetric
from silc_bench.models.base import Preprocess
from silc_bench.results.record import read_record

SMALL = {"resize_short": 40, "resize_max": 80, "out_res": 40, "crop": 24, "stride": 16, "global_view": True}
IDENTITY = {"resize_short": None, "resize_max": None, "out_res": 4, "crop": 4, "stride": 4, "global_view": True}


class Backbone(nn.Module):
    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.preprocess = Preprocess(image_size=(8, 8), mean=mean, std=std)


class FakeCatSeg(nn.Module):
    """CatSeg's API (`model(pixels, class_names)` -> [B, C, H/4, W/4], `model.backbone.preprocess`).

    kind "colour": class k scores by closeness to the fixture colour of label `labels[k]`.
    kind "encoded": full-resolution one-hot of the query written into the pixel (R + 256 G).
    kind "features": a fixed nonlinear function of the pixel (no ties), for the reference test.
    """

    def __init__(self, kind="colour", labels=None, backbone=None):
        super().__init__()
        self.kind, self.labels, self.backbone = kind, labels, backbone or Backbone()
        self.calls, self.seen = 0, []

    def forward(self, pixels, class_names):
        self.calls += 1
        self.seen.append(class_names)
        q = len(class_names)
        if self.kind == "encoded":
            rgb = (pixels * 255).round().long()
            return F.one_hot(rgb[:, 0] + 256 * rgb[:, 1], q).permute(0, 3, 1, 2).float() * 10
        if self.kind == "colour":
            colours = torch.tensor(np.stack([class_colour(k) for k in (self.labels or range(q))]))
            dist = ((pixels[:, None] * 255 - colours[None, :, :, None, None]) ** 2).sum(2)
            return F.avg_pool2d(-dist / 500.0, 4)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(q, 6, generator=g)
        feats = torch.cat([pixels, torch.sin(5 * pixels[:, :2]), pixels[:, :1] * pixels[:, 2:]], dim=1)
        return F.avg_pool2d(torch.einsum("qk,bkhw->bqhw", w, feats) * 3, 4)

    def describe(self):
        return {"format": "fake-catseg", "sha256": None}


def write_column(name, root, **kw):
    entry = ov_seg.dataset_entries(name, OV_SEG.task["dataset_entries"])[kw.pop("entry", 0)]
    write_segmentation_fixture(entry, root, **{"num_images": 2, "size": (20, 28), "seed": 3, **kw})
    return entry


# ---------------------------------------------------------------------- records on every layout
@pytest.mark.parametrize("name,entry", [("ade847", 0), ("pc459", 0), ("ade150", 0), ("pc59", 0), ("pc59", 1),
                                        ("voc20", 0), ("voc21", 0)])
def test_runner_writes_valid_records_on_each_layout(name, entry, tmp_path, monkeypatch):
    used = write_column(name, tmp_path / "data", entry=entry)
    fake = FakeCatSeg(labels=registry.dataset_entry(used).get("query_to_label"))
    monkeypatch.setitem(checkpoints.MODEL_LOADERS, "catseg", lambda *a, **k: fake)
    opts = runner.RunOptions(data_root=str(tmp_path / "data"), out_dir=tmp_path / "out", protocol_overrides=SMALL,
                             progress=False, cache=False, batch_size=5, shard_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fixture is never the full split
        (record,) = runner.run("ov-seg", ["fake"], [name], opts)
    on_disk = read_record(record["_path"])
    assert on_disk["dataset"]["name"] == name and on_disk["details"]["dataset_entry"] == used
    assert on_disk["task"]["name"] == "ov-seg" and on_disk["protocol"]["crop"] == 24 and on_disk["protocol"]["score"] == "sigmoid"
    ds = registry.dataset_entry(used)
    assert len(on_disk["per_class"]["IoU"]) == ds["num_classes"]  # unique names even for ADE-847
    assert on_disk["details"]["num_queries"] == (59 if name == "voc21" else ds["num_classes"])
    for key in ("mIoU", "mIoU_present", "aAcc", "mAcc"):
        assert 0 <= on_disk["metrics"][key] <= 100
    assert on_disk["metrics"]["mIoU_present"] >= on_disk["metrics"]["mIoU"]
    assert on_disk["metrics"]["aAcc"] > 25  # far above chance: the colour model reads the fixture


# ---------------------------------------------------------------------- hand-computed cases
class Tiny(torch.utils.data.Dataset):
    """One 4x4 image whose pixels carry the query the encoded fake will predict there."""

    def __init__(self, base, queries, label):
        self.name, self.spec, self.classnames = base.name, base.spec, base.classnames
        self.num_classes, self.ignore_index = base.num_classes, base.ignore_index
        q = torch.tensor(queries)
        self.image = torch.stack([q % 256, q // 256, torch.zeros_like(q)]).to(torch.uint8)
        self.label = torch.as_tensor(label, dtype=torch.long)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {"image": self.image, "label": self.label, "name": "tiny", "index": i}


def score(dataset, model=None, protocol=IDENTITY):
    model = model or FakeCatSeg("encoded")
    prepared = ov_seg.setup(model, dataset, protocol, "cpu")
    return ov_seg.finalize(dataset, ov_seg.evaluate(model, dataset, prepared, [0], device="cpu"))[0], model


def test_voc21_extra_names_map_to_background(tmp_path):
    write_column("voc21", tmp_path, num_images=1, size=(4, 4))
    base = OV_SEG.open_dataset("voc21", tmp_path, limit=1)
    # VOC-21 labels: 0 background, 1 aeroplane, 15 person, 255 border
    label = [[0, 0, 15, 15], [0, 255, 15, 1], [1, 1, 0, 0], [255, 0, 0, 15]]
    # voc20b queries: 0 aeroplane (-> 1), 3 boat (-> 4), 14 person (-> 15), 20..58 other PC-59 names (-> 0)
    queries = [[25, 14, 14, 14], [40, 3, 14, 0], [0, 58, 20, 14], [0, 30, 0, 14]]
    metrics, model = score(Tiny(base, queries, label))
    assert len(model.seen[0]) == 59 and model.seen[0][20] == ["bag"] and model.seen[0][14] == ["person"]
    # background: label 7 px, predicted 5 (valid), both 4 -> 4/8; aeroplane: 3, 3, 2 -> 2/4;
    # person: 4, 6, 4 -> 4/6; boat only on the border pixel -> not counted. mIoU = (1/2 + 1/2 + 2/3) / 3
    assert metrics["mIoU"] == pytest.approx(100 * (0.5 + 0.5 + 2 / 3) / 3)
    assert metrics["mIoU_present"] == pytest.approx(metrics["mIoU"])
    assert metrics["aAcc"] == pytest.approx(100 * 10 / 14)


def test_pc459_ignores_unlabelled_and_catseg_ignore_label(tmp_path):
    # on disk as CAT-Seg writes it: uint16 .tif, 65535 = unlabelled (LabelMap 0 - 1), 459 = registered ignore
    label = np.array([[0, 0, 1, 1], [0, 65535, 1, 458], [459, 459, 2, 2], [65535, 0, 2, 2]], np.uint16)
    write_pc459(tmp_path, [np.zeros((4, 4, 3), np.uint8)], [label])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = OV_SEG.open_dataset("pc459", tmp_path)
    read = base[0]["label"]
    assert read[2, 0] == 65535 and read[1, 1] == 65535 and read[1, 3] == 458
    queries = [[0, 1, 1, 1], [0, 300, 1, 458], [458, 3, 2, 3], [400, 0, 2, 400]]
    metrics, _ = score(Tiny(base, queries, read))
    # 12 scored pixels. class 0: label 4, pred 3, both 3 -> 3/4; class 1: 3, 4, 3 -> 3/4; class 2: 4, 2, 2 -> 2/4;
    # class 458: 1, 1, 1 -> 1; classes 3 and 400: predicted once on a scored pixel, never labelled -> 0 (mmseg),
    # left out by detectron2; class 300 only on an ignored pixel -> not counted.
    assert metrics["mIoU"] == pytest.approx(100 * (0.75 + 0.75 + 0.5 + 1 + 0 + 0) / 6)  # 50
    assert metrics["mIoU_present"] == pytest.approx(100 * (0.75 + 0.75 + 0.5 + 1) / 4)  # 75
    assert metrics["aAcc"] == pytest.approx(75.0)


# ---------------------------------------------------------------------- against a naive reference
class Images(torch.utils.data.Dataset):
    name, spec, ignore_index = "images", {}, 255

    def __init__(self, sizes, num_classes=7):
        g = torch.Generator().manual_seed(1)
        self.num_classes = num_classes
        self.classnames = [[f"class {k}"] for k in range(num_classes)]
        self.items = []
        for h, w in sizes:  # smooth random images: blobs several windows wide
            coarse = torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g) * 255
            image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0].round().to(torch.uint8)
            self.items.append((image, torch.randint(0, num_classes, (h, w), generator=g)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"image": self.items[i][0], "label": self.items[i][1], "name": str(i), "index": i}


def catseg_reference(model, dataset, p):
    """CAT-Seg's inference_sliding_window + sem_seg_postprocess, one image per forward (Unfold / Fold)."""
    preds = []
    kernel, stride, out = p["crop"], p["stride"], [p["out_res"]] * 2
    unfold, fold = nn.Unfold(kernel_size=kernel, stride=stride), nn.Fold(out, kernel_size=kernel, stride=stride)
    for i in range(len(dataset)):
        s = dataset[i]
        h0, w0 = s["label"].shape
        scale = p["resize_short"] / min(h0, w0)  # detectron2 ResizeShortestEdge, PIL bilinear on uint8
        nh, nw = (p["resize_short"], scale * w0) if h0 < w0 else (scale * h0, p["resize_short"])
        if max(nh, nw) > p["resize_max"]:
            nh, nw = nh * p["resize_max"] / max(nh, nw), nw * p["resize_max"] / max(nh, nw)
        pil = Image.fromarray(s["image"].permute(1, 2, 0).numpy()).resize((int(nw + 0.5), int(nh + 0.5)), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()
        big = F.interpolate(image[None], size=out, mode="bilinear", align_corners=False).squeeze()
        crops = unfold(big).T.reshape(-1, 3, kernel, kernel)
        whole = F.interpolate(image[None], size=(kernel, kernel), mode="bilinear", align_corners=False)
        views = model.backbone.preprocess.normalize(torch.cat((crops, whole)) / 255.0)
        outputs = F.interpolate(model(views, dataset.classnames), size=kernel, mode="bilinear", align_corners=False).sigmoid()
        global_output = F.interpolate(outputs[-1:], size=out, mode="bilinear", align_corners=False)
        outputs = fold(outputs[:-1].flatten(1).T) / fold(unfold(torch.ones([1] + out)))
        outputs = (outputs + global_output) / 2.0
        preds.append(F.interpolate(outputs, size=(h0, w0), mode="bilinear", align_corners=False)[0].argmax(0))
    return preds


def test_harness_equals_catseg_reference_for_any_batching(monkeypatch):
    dataset = Images([(30, 44), (50, 36), (20, 90)])  # the last is capped by resize_max
    model = FakeCatSeg("features", backbone=Backbone(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3)))
    with torch.no_grad():
        preds = catseg_reference(model, dataset, SMALL)
    reference = SegmentationMetric(dataset.num_classes)
    for pred, i in zip(preds, range(len(dataset))):
        reference.update(pred, dataset[i]["label"])
    expected = reference.compute()
    assert len(torch.cat([p.flatten() for p in preds]).unique()) >= 4  # a real test: predictions vary per pixel
    prepared = ov_seg.setup(model, dataset, SMALL, "cpu")
    views = len(dataset) * prepared.details["views_per_image"]
    assert prepared.details["views_per_image"] == 5
    for batch_size, chunk in ((1, 64), (4, 3), (64, 2)):
        monkeypatch.setattr(ov_seg, "CLASS_CHUNK", chunk)
        model.calls = 0
        state = ov_seg.evaluate(model, dataset, prepared, range(len(dataset)), device="cpu", batch_size=batch_size)
        got = SegmentationMetric.from_state(state).compute()
        assert got["IoU"] == pytest.approx(expected["IoU"], abs=1e-9, nan_ok=True)
        assert got["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-9)
        assert model.calls == math.ceil(views / batch_size)  # views of several images share a forward


def test_combine_views_per_pixel_prediction_equals_reference():
    dataset = Images([(30, 44)])
    model = FakeCatSeg("features")
    prepared = ov_seg.setup(model, dataset, SMALL, "cpu")
    s = ov_seg._D2Resized(dataset, [0], SMALL["resize_short"], SMALL["resize_max"])[0]
    with torch.no_grad():
        views = ov_seg.make_views(s["image"].float(), SMALL, prepared.boxes, model.backbone.preprocess.normalize)
        pred = ov_seg.combine_views(model(views, dataset.classnames), prepared.boxes, SMALL, s["label"].shape)
        assert torch.equal(pred, catseg_reference(model, dataset, SMALL)[0])
    assert prepared.boxes == [(0, 0, 24, 24), (0, 16, 24, 40), (16, 0, 40, 24), (16, 16, 40, 40)]
    assert ov_seg.slide_windows(640, 640, 384, 256) == [(0, 0, 384, 384), (0, 256, 384, 640), (256, 0, 640, 384),
                                                        (256, 256, 640, 640)]
    assert ov_seg.d2_resize_shape(512, 683, 640, 2560) == (640, 854)  # detectron2's rounding
    assert ov_seg.d2_resize_shape(100, 1000, 640, 2560) == (256, 2560)


def test_class_chunks_equal_the_reference_on_every_pixel_at_catseg_sizes(monkeypatch):
    """At CAT-Seg's own sizes (640 canvas, 384 windows) classes are combined in chunks; every pixel
    equals CAT-Seg's whole-stack loop for any chunk, 3-class chunks included (folded away)."""
    full = {"resize_short": 640, "resize_max": 2560, "out_res": 640, "crop": 384, "stride": 256, "global_view": True}
    # 2 threads: the sigmoid's thread split then falls between vectors for any block (README, Speed).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_chunks_at_catseg_sizes(full, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _check_chunks_at_catseg_sizes(full, monkeypatch):
    dataset = Images([(72, 100)], num_classes=11)
    model = FakeCatSeg("features")
    prepared = ov_seg.setup(model, dataset, full, "cpu")
    s = ov_seg._D2Resized(dataset, [0], full["resize_short"], full["resize_max"])[0]
    with torch.no_grad():
        views = ov_seg.make_views(s["image"].float(), full, prepared.boxes, model.backbone.preprocess.normalize)
        logits = model(views, dataset.classnames)
        logits[:, 9] = logits[:, 4]  # an exact tie in another chunk: class 4 must keep it
        expected = catseg_reference(_FixedLogits(logits, model.backbone), dataset, full)[0]
        assert len(expected.unique()) >= 3 and not (expected == 9).any()
        for chunk in (1, 3, 4, 64):
            monkeypatch.setattr(ov_seg, "CLASS_CHUNK", chunk)
            assert torch.equal(ov_seg.combine_views(logits, prepared.boxes, full, s["label"].shape), expected)
            assert torch.equal(ov_seg.combine_views(logits, prepared.boxes, full, s["label"].shape, None, chunk),
                               expected)
        logits[0, 2, 0, 0] = float("nan")  # the whole stack then, with max's own NaN rule
        expected = catseg_reference(_FixedLogits(logits, model.backbone), dataset, full)[0]
        assert torch.equal(ov_seg.combine_views(logits, prepared.boxes, full, s["label"].shape, None, 2), expected)


def test_combine_blocks_fit_the_cpu_cache_and_are_chunks_on_an_accelerator():
    full = {"out_res": 640, "crop": 384}
    per_class = 4 * (5 * 384 * 384 + 2 * 640 * 640 + 512 * 683)
    assert ov_seg.combine_block_size(150, 5, full, (512, 683), "cpu") == max(1, ov_seg.CPU_COMBINE_BLOCK_BYTES // per_class)
    assert ov_seg.combine_block_size(150, 5, full, (512, 683), "meta") == ov_seg.CLASS_CHUNK


class _FixedLogits(nn.Module):
    """A CatSeg stand-in returning the given logits, so that the reference sees the same values."""

    def __init__(self, logits, backbone):
        super().__init__()
        self.logits, self.backbone = logits, backbone

    def forward(self, pixels, class_names):
        return self.logits


# ---------------------------------------------------------------------- bad input
def test_missing_dataset_names_folders_and_preparation(tmp_path):
    with pytest.raises(UserError) as e:
        OV_SEG.open_dataset("pc459", tmp_path)
    assert str(tmp_path / "VOCdevkit/VOC2010") in str(e.value) and "prepare_pascal_context_459.py" in str(e.value)
    with pytest.raises(UserError) as e:  # pc59: neither CAT-Seg's nor mmseg's layout
        OV_SEG.open_dataset("pc59", tmp_path)
    msg = str(e.value)
    assert "prepare_pascal_context_59.py" in msg and str(tmp_path / "VOCdevkit/VOC2010/SegmentationClassContext") in msg


def test_corrupt_image_in_evaluation_names_the_file(tmp_path):
    write_column("ade847", tmp_path, num_images=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = OV_SEG.open_dataset("ade847", tmp_path)
    victim = ds.samples[1].image
    victim.write_bytes(b"not a jpeg" * 8)
    model = FakeCatSeg()
    with pytest.raises(UserError, match=re.escape(str(victim))):
        ov_seg.evaluate(model, ds, ov_seg.setup(model, ds, SMALL, "cpu"), range(2), device="cpu")


def test_out_of_range_label_in_evaluation_names_the_file(tmp_path):
    write_column("ade847", tmp_path, num_images=1)
    ds = OV_SEG.open_dataset("ade847", tmp_path, limit=1)
    raw = np.asarray(Image.open(ds.samples[0].label)).copy()
    raw[0, 0] = 847
    Image.fromarray(raw).save(ds.samples[0].label)
    model = FakeCatSeg()
    with pytest.raises(UserError) as e:
        ov_seg.evaluate(model, ds, ov_seg.setup(model, ds, SMALL, "cpu"), range(1), device="cpu")
    assert str(ds.samples[0].label) in str(e.value) and re.search(r"\b847\b", str(e.value))


def test_bad_protocol_and_vocabulary(tmp_path):
    write_column("voc21", tmp_path, num_images=1)
    ds = OV_SEG.open_dataset("voc21", tmp_path, limit=1)
    with pytest.raises(UserError, match="ov-seg.yaml"):
        ov_seg.setup(FakeCatSeg(), ds, dict(SMALL, stride=10), "cpu")  # (40 - 24) % 10: pixels uncovered
    with pytest.raises(UserError, match="sigmoid"):
        ov_seg.setup(FakeCatSeg(), ds, dict(SMALL, score="softmax"), "cpu")
    with pytest.raises(UserError, match="CAT-Seg"):
        ov_seg.setup(nn.Linear(2, 2), ds, SMALL, "cpu")  # a bare model, not a CatSeg
    ds.spec = dict(ds.spec, query_to_label=[1] * 58 + [21])
    with pytest.raises(UserError, match="query_to_label"):
        ov_seg.setup(FakeCatSeg(), ds, SMALL, "cpu")


# ---------------------------------------------------------------------- the real CatSeg
def test_real_catseg_on_a_tiny_backbone(tiny_big_vision_npz, tmp_path):
    """The harness drives silc_bench.catseg.CatSeg; text embedded once equals names on every forward."""
    from silc_bench.catseg.model import CatSeg
    from silc_bench.checkpoints.big_vision import load_big_vision

    catseg = CatSeg(load_big_vision(tiny_big_vision_npz), {"crop_size": 32}).eval()
    write_column("voc21", tmp_path, num_images=1, size=(30, 40))
    ds = OV_SEG.open_dataset("voc21", tmp_path, limit=1)
    protocol = {"resize_short": 40, "resize_max": 80, "out_res": 48, "crop": 32, "stride": 16, "global_view": True}
    prepared = ov_seg.setup(catseg, ds, protocol, "cpu")
    assert prepared.details["class_input"] == "embeddings" and prepared.classes.shape[0] == 59
    state = ov_seg.evaluate(catseg, ds, prepared, [0], device="cpu", batch_size=5)
    prepared.classes = prepared.query_names  # CatSeg embeds the names itself on each forward
    again = ov_seg.evaluate(catseg, ds, prepared, [0], device="cpu", batch_size=5)
    assert all(torch.equal(state[k], again[k]) for k in state)
    metrics, _ = ov_seg.finalize(ds, state)
    assert 0 <= metrics["mIoU"] <= 100 and state["label_area"].sum() > 0
