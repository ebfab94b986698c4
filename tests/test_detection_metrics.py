"""Box AP: faster-coco-eval under our wrappers equals pycocotools' COCOeval and the official lvis API
(run here with a numpy 2 shim: lvis 0.5.3 on PyPI still calls `np.float`), and gives the known
answers of hand-made cases."""
import json
import math

import numpy as np
import pytest

from silc_bench.metrics.detection import cap_per_image, coco_box_ap, lvis_box_ap

FREQ = ["f", "f", "c", "c", "r", "r", "f"]


def _fixture(seed=0, num_images=24, lvis=False):
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": f"c{i}", **({"frequency": FREQ[i]} if lvis else {})} for i in range(len(FREQ))]
    images, anns, dets = [], [], []
    for i in range(1, num_images + 1):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        present = set()
        for _ in range(int(rng.integers(0, 7))):
            c = int(rng.integers(1, len(FREQ) + 1))
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
            present.add(c)
            for _ in range(int(rng.integers(0, 3))):  # noisy hits, some good, some poor
                jit = rng.normal(0, 0.15 * min(bw, bh), 4)
                dets.append({"image_id": i, "category_id": c if rng.random() < 0.8 else int(rng.integers(1, 8)),
                             "bbox": [x + jit[0], y + jit[1], max(bw + jit[2], 1.0), max(bh + jit[3], 1.0)],
                             "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 40))):  # background false positives
            dets.append({"image_id": i, "category_id": int(rng.integers(1, 8)),
                         "bbox": [float(rng.uniform(0, w - 20)), float(rng.uniform(0, h - 20)), 20.0, 20.0],
                         "score": float(rng.random())})
        img = {"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"}
        if lvis:
            absent = [c for c in range(1, 8) if c not in present]
            rng.shuffle(absent)
            img["neg_category_ids"] = sorted(absent[: len(absent) // 2])
            img["not_exhaustive_category_ids"] = sorted(c for c in present if rng.random() < 0.3)
        images.append(img)
    if lvis:  # every category needs ground truth somewhere for lvis-api's frequency groups
        for c in range(1, 8):
            if not any(a["category_id"] == c for a in anns):
                anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": c, "bbox": [1.0, 1.0, 30.0, 30.0],
                             "area": 900.0, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": cats}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_ap_equals_pycocotools(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = _fixture(seed)
    ours = coco_box_ap(gt, dets)
    ref_gt = COCO()
    ref_gt.dataset = json.loads(json.dumps(gt))
    ref_gt.createIndex()
    ev = COCOeval(ref_gt, ref_gt.loadRes(json.loads(json.dumps(dets))), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    for i, k in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        want = float("nan") if ev.stats[i] < 0 else 100 * ev.stats[i]
        assert ours[k] == pytest.approx(want, abs=1e-9, nan_ok=True), k
    assert 0 < ours["AP"] < 100


@pytest.fixture
def lvis_api(monkeypatch):
    pytest.importorskip("lvis")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3: np.float in accumulate()
    from lvis import LVIS, LVISEval, LVISResults
    return LVIS, LVISResults, LVISEval


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lvis_ap_equals_the_lvis_api(seed, lvis_api, tmp_path):
    LVIS, LVISResults, LVISEval = lvis_api
    gt, dets = _fixture(seed, lvis=True)
    # more than 300 detections on one image: the per-image cap across categories matters
    rng = np.random.default_rng(seed + 10)
    dets += [{"image_id": 2, "category_id": int(rng.integers(1, 8)), "bbox": [5.0, 5.0, 40.0, 40.0],
              "score": float(rng.random())} for _ in range(400)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ref_gt = LVIS(str(path))
    ev = LVISEval(ref_gt, LVISResults(ref_gt, json.loads(json.dumps(dets)), max_dets=300), iou_type="bbox")
    ev.run()
    want = ev.get_results()
    ours = lvis_box_ap(gt, dets)
    for k in ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]:
        w = float(want[k])
        assert ours[k] == pytest.approx(float("nan") if w < 0 else 100 * w, abs=1e-9, nan_ok=True), k
    assert 0 < ours["AP"] < 100


def _one_image(lvis=False, **img):
    gt = {"images": [{"id": 1, "width": 100, "height": 100, **img}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a", **({"frequency": "f"} if lvis else {})},
                         {"id": 2, "name": "b", **({"frequency": "r"} if lvis else {})}]}
    return gt


def test_known_answers():
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5}
    fp = {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.9}
    assert coco_box_ap(_one_image(), [hit])["AP"] == pytest.approx(100.0)
    # a higher-scoring false positive first: precision 1/2 at full recall, at every recall point
    assert coco_box_ap(_one_image(), [hit, fp])["AP"] == pytest.approx(50.0)
    assert coco_box_ap(_one_image(), [])["AP"] == 0.0
    # LVIS: a category neither annotated nor negative on the image is not evaluated there ...
    other = {"image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.99}
    gt = _one_image(lvis=True, neg_category_ids=[], not_exhaustive_category_ids=[])
    assert lvis_box_ap(gt, [hit, other])["AP"] == pytest.approx(100.0)
    assert math.isnan(lvis_box_ap(gt, [hit, other])["APr"])  # no ground truth of a rare class
    # ... and a not-exhaustive category's unmatched detections are ignored, not false positives
    gt_ne = _one_image(lvis=True, neg_category_ids=[2], not_exhaustive_category_ids=[1])
    assert lvis_box_ap(gt_ne, [hit, fp])["AP"] == pytest.approx(100.0)
    gt_ex = _one_image(lvis=True, neg_category_ids=[2], not_exhaustive_category_ids=[])
    assert lvis_box_ap(gt_ex, [hit, fp])["AP"] == pytest.approx(50.0)


def test_cap_is_per_image_across_categories():
    dets = [{"image_id": 1, "category_id": c, "bbox": [0, 0, 1, 1], "score": s}
            for c, s in [(1, 0.1), (2, 0.9), (3, 0.5)]] + [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1],
                                                           "score": 0.01}]
    kept = cap_per_image(dets, 2)
    assert sorted((d["image_id"], d["category_id"]) for d in kept) == [(1, 2), (1, 3), (2, 1)]


def test_lvis_needs_frequencies():
    with pytest.raises(ValueError, match="frequency"):
        lvis_box_ap(_one_image(), [])
