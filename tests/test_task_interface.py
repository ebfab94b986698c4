"""The task interface: every registered task runs end to end through the runner on a fixture in its
real layout with a model whose right answer is known; shard results merge as the contract says."""
import numpy as np
import pytest
import torch

from silc_bench import checkpoints, registry, runner
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.data.fixtures_image_level import write_cifar100, write_karpathy
from silc_bench.data.segmentation import open_dataset as open_segmentation
from silc_bench.harness import HARNESSES, get_harness
from silc_bench.harness.base import EXAMPLES, INDEX, SUMS, merge_results

from oracles import ColourCatSeg, ColourLit, ColourNameOracle, ColourOwl


# task -> (fixture writer, dataset, --protocol overrides, model factory, {metric: known answer})
def _zs_seg(root):
    write_segmentation_fixture("ade150", root, num_images=2, size=(48, 64), seed=1)
    names = [syns[0] for syns in open_segmentation("ade150", root).classnames]
    return "ade150", {"short_side": 48, "crop": 32, "stride": 16, "templates": "a_photo_of"}, ColourNameOracle(names)


def _ov_seg(root):
    write_segmentation_fixture("ade150", root, num_images=2, size=(40, 40), seed=1)
    return "ade150", {"resize_short": None, "resize_max": None, "out_res": 40, "crop": 24, "stride": 16, "global_view": False}, ColourCatSeg()


def _cifar(root):
    write_cifar100(root, train_per_class=2, test_per_class=1, num_classes=100)
    return [f"thing_{k:03d}" for k in range(100)]


def _zs_cls(root):
    return "cifar100", {}, ColourNameOracle(_cifar(root), image_size=(32, 32))


def _fewshot(root):
    return "cifar100", {}, ColourNameOracle(_cifar(root), image_size=(32, 32))  # 2 per class: k > 2 shots take both


def _retrieval(root):
    _, names = write_karpathy(root, "coco", num_images=5)
    return "coco", {}, ColourNameOracle(names)


def _ov_det(root):
    from silc_bench.data.fixtures_detection import write_coco_detection

    write_coco_detection(root, num_images=5)
    # LVIS: federated rules and images named by coco_url; input 64 = the long side (no resize, padded)
    return "lvis", {"input_size": 64, "templates": "a_photo_of"}, ColourOwl([f"thing_{k:03d}" for k in range(12)])


def _lit_decoder(root):
    return "cifar100", {}, ColourLit(_cifar(root))  # generated class names, scored by exact match


def pixel_oracle_miou(root, predict) -> dict:
    """mmseg's mIoU / aAcc computed here from the oracle's own per-pixel answer on whole images
    (numpy confusion matrix): what windows of a patch-size-1 oracle must reproduce exactly."""
    ds = open_segmentation("ade150", root)
    conf = np.zeros((ds.num_classes, ds.num_classes), np.int64)
    for i in range(len(ds)):
        s = ds[i]
        pred = predict(s["image"].float()[None] / 255.0).numpy().ravel()
        label = s["label"].numpy().ravel()
        ok = label != ds.ignore_index
        np.add.at(conf, (label[ok], pred[ok]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    return {"mIoU": 100 * np.nanmean(iou), "aAcc": 100 * inter.sum() / conf.sum()}


def _zs_seg_answer(root):
    model = _zs_seg(root)[2]
    return pixel_oracle_miou(root, lambda x: model.dense_features(x)[0].argmax(-1))


def _ov_seg_answer(root):
    model = ColourCatSeg()
    return pixel_oracle_miou(root, lambda x: model(x, [None] * 150)[0].argmax(0))


CONTRACT = {
    "zs-seg": (_zs_seg, _zs_seg_answer),
    "ov-seg": (_ov_seg, _ov_seg_answer),
    "zs-cls": (_zs_cls, {"top1": 100.0, "top5": 100.0}),
    "fewshot": (_fewshot, {"top1_1shot": 100.0, "top1_25shot_seed2": 100.0}),
    "retrieval": (_retrieval, {"i2t_R@1": 100.0, "t2i_R@1": 100.0, "t2i_R@5": 100.0}),
    "ov-det": (_ov_det, {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}),
    "lit-decoder": (_lit_decoder, {"score": 100.0, "accuracy": 100.0}),
}


def test_every_registered_task_has_a_contract_case():
    assert set(CONTRACT) == set(registry.tasks()), "add a known-answer case for the new task here"
    assert {t["harness"] for t in registry.tasks().values()} <= set(HARNESSES)


@pytest.mark.parametrize("task", sorted(CONTRACT))
def test_task_end_to_end_with_a_known_answer(task, tmp_path, monkeypatch):
    write, expected = CONTRACT[task]
    dataset, overrides, model = write(tmp_path / "data")
    spec = registry.task_spec(task)
    harness = get_harness(spec)
    monkeypatch.setitem(checkpoints.MODEL_LOADERS, harness.model_loader, lambda *a, **k: model)
    opts = runner.RunOptions(data_root=str(tmp_path / "data"), out_dir=tmp_path / "out", protocol_overrides=overrides,
                             shard_size=2, batch_size=3, progress=False)
    (record,) = runner.run(task, ["oracle"], [dataset], opts)
    if callable(expected):
        expected = expected(tmp_path / "data")
    for metric, value in expected.items():
        assert record["metrics"][metric] == pytest.approx(value), metric
    assert record["metric"]["primary"] == spec["metric"]["primary"]
    assert all(k in record["metrics"] for k in record["metric"]["report"])


def test_merge_adds_sums_and_orders_examples():
    a = {SUMS: {"n": torch.tensor([1, 2])}, EXAMPLES: {INDEX: torch.tensor([4, 5]), "x": torch.tensor([40., 50.]),
                                                         "s": ["d", "e"]}}
    b = {SUMS: {"n": torch.tensor([10, 20])}, EXAMPLES: {INDEX: torch.tensor([0, 1]), "x": torch.tensor([0., 10.]),
                                                           "s": ["a", "b"]}}
    out = merge_results([a, b])
    assert out[SUMS]["n"].tolist() == [11, 22]
    assert out[EXAMPLES][INDEX].tolist() == [0, 1, 4, 5]
    assert out[EXAMPLES]["x"].tolist() == [0, 10, 40, 50] and out[EXAMPLES]["s"] == ["a", "b", "d", "e"]
    again = merge_results([b, a])  # the order shards arrive in does not matter
    assert torch.equal(again[EXAMPLES]["x"], out[EXAMPLES]["x"]) and again[EXAMPLES]["s"] == out[EXAMPLES]["s"]
    with pytest.raises(RuntimeError, match="twice"):
        merge_results([a, a])


def test_runner_names_no_task_and_no_model_kind():
    import inspect

    source = inspect.getsource(runner)
    for name in [*registry.tasks(), "catseg", "zs_seg", "ov_seg", "ov_det", "owl", "lit_decoder", "litdec", "load_model("]:
        assert name not in source, name
