"""zs-seg pixel-exact with an mmseg-pipeline reference: mmcv's own image reader and Resize
transform, mmseg's own `EncoderDecoder.slide_inference`, on odd sizes, an EXIF-rotated JPEG, a
CMYK JPEG and a 2000x300 image, for a big_vision and an open_clip model; plus the pieces alone."""
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from silc_bench import registry
from silc_bench.checkpoints import load_model
from silc_bench.harness import get_harness, zs_seg

mmcv = pytest.importorskip("mmcv")
cv2 = pytest.importorskip("cv2")

# A tiny open_clip ViT (patch 16): registered as an architecture, and written into a local-dir folder.
OPEN_CLIP_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                                 "patch_size": 16, "mlp_ratio": 2.0},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
SIZES = [(37, 53), (61, 45), (300, 2000)]  # (h, w): odd sizes, then wider than 4.6:1


def _encoder_decoder():
    """mmseg's EncoderDecoder class; mmcv-lite has no compiled ops, which mmseg.models imports."""
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None})

    for name in ("mmcv.ops", "mmcv._ext"):
        sys.modules.setdefault(name, Stub(name))
    try:
        from mmseg.models.segmentors.encoder_decoder import EncoderDecoder
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"mmseg's EncoderDecoder does not import here ({type(e).__name__}: {e})")
    return EncoderDecoder


def _exif_jpeg(path, rgb_upright: np.ndarray):
    """Store the image rotated, with EXIF orientation 6 saying how to turn it upright."""
    stored = np.ascontiguousarray(np.rot90(rgb_upright, k=1))  # orientation 6: rotate 90 CW to display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())


def write_fixture(root, num_classes=150):
    from silc_bench.data.fixtures import random_sample, write_ade150

    rng = np.random.default_rng(7)
    images, labels = zip(*[random_sample(num_classes, size, rng) for size in SIZES + [(41, 29), (33, 47)]])
    folder = write_ade150(root, list(images), list(labels))
    stems = sorted((folder / "images/validation").glob("*.jpg"))
    _exif_jpeg(stems[3], images[3])                                    # EXIF-rotated
    Image.fromarray(images[4]).convert("CMYK").save(stems[4], quality=95)  # CMYK JPEG
    for extra in folder.glob("images/training/*"):
        extra.unlink()
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmseg_ref")
    write_fixture(root)
    return root


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("oc") / "SilcMmsegRef-ViT.json"
    path.write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(path)
    return load_model("open_clip:SilcMmsegRef-ViT:random-init")


def harness_predictions(model, root, monkeypatch, batch_size=5):
    """The harness's per-image predictions (captured where they reach the metric)."""
    harness = get_harness(registry.task_spec("zs-seg"))
    ds = harness.open_dataset("ade150", root)
    protocol = harness.protocol_for(ds, {"templates": "a_photo_of"})
    prepared = harness.setup(model, ds, protocol, "cpu")
    seen = []
    real = zs_seg.SegmentationMetric.update
    monkeypatch.setattr(zs_seg.SegmentationMetric, "update",
                        lambda self, p, t: (seen.append((p.clone(), t.clone())), real(self, p, t)))
    harness.evaluate(model, ds, prepared, range(len(ds)), device="cpu", batch_size=batch_size)
    # Batched crops finish images out of order (the metric does not care): pair each by its label.
    labels = [ds[i]["label"] for i in range(len(ds))]
    preds = [next(p for p, t in seen if t.shape == label.shape and torch.equal(t, label)) for label in labels]
    assert len(seen) == len(ds)
    return ds, prepared, preds


@torch.inference_mode()
def mmseg_reference(model, ds, prepared, index):
    """mmcv LoadImageFromFile + Resize(scale=(2048, 448), keep_ratio=True), mmseg slide_inference
    with the model's cosine patch logits bilinear to each crop, bilinear to the label, argmax."""
    from mmcv.transforms import LoadImageFromFile, Resize

    EncoderDecoder = _encoder_decoder()
    p = prepared.protocol
    results = LoadImageFromFile()({"img_path": str(ds.samples[index].image)})
    results = Resize(scale=(p["long_side_max"], p["short_side"]), keep_ratio=True)(results)
    rgb = torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1])).permute(2, 0, 1).float()
    inputs = model.preprocess.normalize(rgb[None] / 255.0)

    class Segmentor:  # what slide_inference reads from `self`
        test_cfg = types.SimpleNamespace(stride=(p["stride"], p["stride"]), crop_size=(p["crop"], p["crop"]))
        out_channels = ds.num_classes

        def encode_decode(self, crop, metas):
            logits = zs_seg._patch_logits(model, prepared, crop)
            return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)

    metas = [{"img_shape": tuple(inputs.shape[-2:]), "ori_shape": tuple(ds[index]["label"].shape)}]
    logits = EncoderDecoder.slide_inference(Segmentor(), inputs, metas)
    logits = F.interpolate(logits, size=metas[0]["ori_shape"], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["big_vision", "open_clip"])
def test_predictions_equal_the_mmseg_pipeline_on_every_pixel(which, tiny_big_vision_npz, open_clip_model, data_root,
                                                            monkeypatch):
    """Every pixel equal to mmseg's own slide inference, whatever the batch size and stitching block."""
    model = load_model(str(tiny_big_vision_npz)) if which == "big_vision" else open_clip_model
    refs = None
    # Stitching over blocks of classes (on a CPU, cache-sized): the default, 1 and 7 classes at a time.
    for batch_size, block in ((5, None), (1, 1), (16, 7)):
        if block is not None:
            monkeypatch.setattr(zs_seg, "stitch_block_size", lambda *args, block=block: block)
        ds, prepared, preds = harness_predictions(model, data_root, monkeypatch, batch_size=batch_size)
        assert [tuple(p.shape) for p in preds] == [tuple(ds[i]["label"].shape) for i in range(len(ds))]
        refs = refs or [mmseg_reference(model, ds, prepared, i) for i in range(len(ds))]
        for i, (pred, ref) in enumerate(zip(preds, refs)):
            assert torch.equal(pred, ref), (f"batch {batch_size}, image {i}: {(pred != ref).sum().item()} of "
                                            f"{pred.numel()} pixels differ")
        monkeypatch.undo()  # harness_predictions patches the metric to capture predictions


# ---------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("h,w", [(37, 53), (61, 45), (300, 2000), (448, 448), (1001, 333)])
def test_resize_equals_mmcv_imrescale_byte_for_byte(h, w):
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = zs_seg.MmsegRescale(448, 2048)({"image": torch.from_numpy(image).permute(2, 0, 1)})["image"]
    theirs = mmcv.imrescale(image, (2048, 448), interpolation="bilinear")
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), theirs)


def test_decoders_match_their_anchors(data_root):
    harness = get_harness(registry.task_spec("zs-seg"))
    ds = harness.open_dataset("ade150", data_root)
    assert ds.decoder == "cv2"
    for i in range(len(ds)):
        path = ds.samples[i].image
        mm = mmcv.imfrombytes(path.read_bytes(), flag="color", backend="cv2")[..., ::-1]  # mmseg: BGR -> RGB
        assert np.array_equal(ds[i]["image"].permute(1, 2, 0).numpy(), mm)
    rotated = ds.samples[3].image
    with Image.open(rotated) as im:
        plain = np.asarray(im.convert("RGB"))
    assert plain.shape[:2] == ds[3]["image"].shape[1:][::-1], "PIL alone leaves the EXIF image transposed"
    ov = get_harness(registry.task_spec("ov-seg")).open_dataset("ade150", data_root)
    assert ov.decoder == "pil_exif" and tuple(ov[3]["image"].shape[1:]) == tuple(ds[3]["image"].shape[1:])


def test_wide_windows_floor_the_patch_grid_in_every_format(tiny_big_vision_npz, open_clip_model):
    """A 307 x 448 window (a 2000 x 300 image at short side 448): patches floor, as open_clip does."""
    pixels = torch.randn(1, 3, 307 // 8 * 8 + 3, 45)
    bv = load_model(str(tiny_big_vision_npz))
    assert torch.equal(bv.dense_features(pixels), bv.dense_features(pixels[..., :304, :40]))
    oc = open_clip_model.dense_features(torch.randn(1, 3, 37, 50))
    assert tuple(oc.shape[1:3]) == (2, 3)


def test_local_dir_records_carry_the_weights_hash(tmp_path, open_clip_model):
    from safetensors.torch import save_file

    from silc_bench.hashing import sha256_file
    from silc_bench.runner import RunOptions, model_folder

    folder = tmp_path / "ocdir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in open_clip_model.model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    model = load_model(f"open_clip:local-dir:{folder}")
    assert model.describe()["sha256"] == sha256_file(folder / "open_clip_model.safetensors")
    assert model_folder(f"open_clip:local-dir:{folder}", RunOptions()).startswith("open_clip-ocdir-")
