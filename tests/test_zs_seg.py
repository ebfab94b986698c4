"""The zero-shot segmentation harness against answers known by construction and a naive reference."""
import math

import cv2
import pytest
import torch
import torch.nn.functional as F

from silc_bench.harness import zs_seg
from silc_bench.models.base import Preprocess, Tokenizer, VisionLanguageModel

PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]], dtype=torch.float32)


class WordTokenizer(Tokenizer):
    """'a photo of a class3.' -> id 3 in the first position (the fake text tower reads it)."""

    context_length = 4

    def __call__(self, texts):
        ids = [int(t.split("class")[1].split(".")[0].split()[0]) if "class" in t else 0 for t in texts]
        return torch.tensor(ids, dtype=torch.long)[:, None].repeat(1, self.context_length)

    def describe(self):
        return {"kind": "fake"}


class ColourOracle(VisionLanguageModel):
    """Patch size 1; a pixel's embedding is the one-hot of its nearest palette colour, so its
    correct class is known by construction. Text embedding of 'classK' is one-hot K."""

    patch_size = 1
    dense_modes = ("oracle",)
    default_dense_mode = "oracle"

    def __init__(self, num_classes=5, noise=0.0):
        super().__init__()
        self.tokenizer = WordTokenizer()
        self.preprocess = Preprocess(image_size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.num_classes = num_classes
        self.noise = noise
        self.forward_calls = 0

    def dense_features(self, pixels, mode=None):
        self.forward_calls += 1
        rgb = pixels.permute(0, 2, 3, 1) * 255.0  # [B, h, w, 3]
        dist = ((rgb[..., None, :] - PALETTE[: self.num_classes]) ** 2).sum(-1)
        feats = F.one_hot(dist.argmin(-1), self.num_classes).float()
        if self.noise:  # seeded by each crop's content, so it does not depend on batching
            for b in range(feats.shape[0]):
                g = torch.Generator().manual_seed(int(pixels[b].double().sum().item() * 1000) % 2**31)
                feats[b] += self.noise * torch.randn(feats[b].shape, generator=g)
        return feats

    def encode_text(self, token_ids):
        return F.one_hot(token_ids[:, 0], self.num_classes).float()

    def encode_image(self, pixels):
        return self.dense_features(pixels).mean(dim=(1, 2))

    @property
    def logit_scale(self):
        return None

    @property
    def logit_bias(self):
        return None


class ColourDataset(torch.utils.data.Dataset):
    """Random rectangles of palette colours; the label is the colour's index; some pixels ignored."""

    ignore_index = 255

    def __init__(self, n=4, size=(32, 56), num_classes=5, seed=0):
        self.num_classes = num_classes
        self.classnames = [[f"class{k}", f"class{k} thing"] if k % 2 else [f"class{k}"] for k in range(num_classes)]
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            h, w = size[0], size[1] - 8 * i  # short side 32 = the protocol's: no resampling
            label = torch.randint(0, num_classes, (h // 8, w // 8), generator=g)
            label = label.repeat_interleave(8, 0).repeat_interleave(8, 1)
            label = F.pad(label, (0, w - label.shape[1], 0, h - label.shape[0]), value=0)
            image = PALETTE[label].permute(2, 0, 1).to(torch.uint8)
            label = label.clone()
            label[:2] = 255  # ignored rows
            self.items.append((image, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, label = self.items[i]
        return {"image": image, "label": label, "name": f"img{i}", "index": i}


PROTOCOL = {"short_side": 32, "long_side_max": 2048, "crop": 24, "stride": 12, "templates": "a_photo_of", "dense_mode": None}


def run(model, dataset, batch_size=16, protocol=PROTOCOL):
    prepared = zs_seg.setup(model, dataset, protocol, "cpu")
    state = zs_seg.evaluate(model, dataset, prepared, range(len(dataset)), device="cpu", batch_size=batch_size)
    return zs_seg.finalize(dataset, state)


def test_rescale_size_matches_mmseg_keep_ratio():
    # ADE image 512x683 -> short side 448; a very wide image is capped by the long side.
    assert zs_seg.rescale_size(512, 683, 448, 2048) == (448, 598)
    assert zs_seg.rescale_size(100, 1000, 448, 2048) == (205, 2048)
    assert zs_seg.rescale_size(448, 448, 448, 2048) == (448, 448)


def test_slide_windows_cover_like_mmseg():
    boxes = zs_seg.slide_windows(448, 598, 448, 224)
    assert boxes == [(0, 0, 448, 448), (0, 150, 448, 598)]
    boxes = zs_seg.slide_windows(600, 1000, 448, 224)
    assert len(boxes) == 2 * 4 and boxes[-1] == (152, 552, 600, 1000)
    # Smaller than the crop: one window, the whole image.
    assert zs_seg.slide_windows(100, 300, 448, 224) == [(0, 0, 100, 300)]


def test_oracle_model_scores_100():
    metrics, per_class = run(ColourOracle(), ColourDataset())
    assert metrics["mIoU"] == pytest.approx(100.0)
    assert metrics["aAcc"] == pytest.approx(100.0)
    assert set(per_class["IoU"]) == {f"class{k}" for k in range(5)}


def naive_reference(model, dataset, protocol):
    """One crop per forward, written without the harness: the anchor repositories' loop."""
    from silc_bench.metrics.segmentation import SegmentationMetric

    text = zs_seg.class_embeddings(model, dataset.classnames, ["a photo of a {}."], "cpu")
    metric = SegmentationMetric(dataset.num_classes)
    crop, stride = protocol["crop"], protocol["stride"]
    for i in range(len(dataset)):
        s = dataset[i]
        h0, w0 = s["label"].shape
        f = min(protocol["long_side_max"] / max(h0, w0), protocol["short_side"] / min(h0, w0))
        h, w = int(h0 * f + 0.5), int(w0 * f + 0.5)
        # mmcv.imrescale: cv2 INTER_LINEAR on the 8-bit image (as the mmseg-based anchors resize)
        img = torch.from_numpy(cv2.resize(s["image"].permute(1, 2, 0).numpy(), (w, h), interpolation=cv2.INTER_LINEAR))
        img = img.permute(2, 0, 1)[None].float()
        img = model.preprocess.normalize(img / 255.0)
        total = torch.zeros(1, dataset.num_classes, h, w)
        count = torch.zeros(1, 1, h, w)
        for r in range(max(h - crop + stride - 1, 0) // stride + 1):
            for c in range(max(w - crop + stride - 1, 0) // stride + 1):
                y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                feats = F.normalize(model.dense_features(img[:, :, y1:y2, x1:x2]), dim=-1)[0]
                per_syn = torch.einsum("hwd,csd->cshw", feats, text)
                logits = per_syn.max(dim=1).values[None]
                total[:, :, y1:y2, x1:x2] += F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
                count[:, :, y1:y2, x1:x2] += 1
        out = F.interpolate(total / count, size=(h0, w0), mode="bilinear", align_corners=False)
        metric.update(out[0].argmax(0), s["label"])
    return metric.compute()


def test_harness_equals_naive_per_crop_loop_and_ignores_batch_size():
    model = ColourOracle(noise=0.7)
    dataset = ColourDataset(n=3, size=(40, 60))  # resized to short side 32: the resampling path too
    expected = naive_reference(model, dataset, PROTOCOL)
    assert expected["mIoU"] < 99  # the noise makes this a real test
    for batch_size in (1, 7, 64):
        metrics, _ = run(model, dataset, batch_size=batch_size)
        assert metrics["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-9)
        assert metrics["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-9)


def test_crops_from_several_images_share_a_forward():
    model = ColourOracle()
    dataset = ColourDataset(n=4)
    run(model, dataset, batch_size=64)
    windows = sum(len(zs_seg.slide_windows(*zs_seg.rescale_size(*dataset[i]["label"].shape, 32, 2048), 24, 12))
                  for i in range(len(dataset)))
    assert model.forward_calls < windows / 2


def test_text_embeddings_average_normalised_templates():
    model = ColourOracle()
    emb = zs_seg.class_embeddings(model, [["class1", "class2"], ["class3"]], ["{}.", "a {}."], "cpu")
    assert emb.shape == (2, 2, 5)
    assert torch.allclose(emb[0, 0], F.one_hot(torch.tensor(1), 5).float())
    assert torch.allclose(emb[1, 1], emb[1, 0])  # padded with the first synonym
    assert math.isclose(emb.norm(dim=-1).min().item(), 1.0, rel_tol=1e-6)


def test_default_batch_size_fits_the_device():
    """On a CPU crops share a forward up to ~1024 tokens (bigger forwards run slower per crop there);
    on an accelerator 16. An explicit --batch-size always wins (the runner only asks when it is unset)."""
    from types import SimpleNamespace

    def setup(crop):
        return zs_seg.ZsSegSetup(text=torch.zeros(1, 1, 1), protocol={"crop": crop}, dense_mode="x")

    vit_b16, toy = SimpleNamespace(patch_size=16), SimpleNamespace(patch_size=8)
    assert zs_seg.default_batch_size(vit_b16, setup(448), "cpu") == 1    # 785 tokens
    assert zs_seg.default_batch_size(vit_b16, setup(224), "cpu") == 5    # 197 tokens
    assert zs_seg.default_batch_size(toy, setup(64), "cpu") == 15        # 65 tokens
    assert zs_seg.default_batch_size(vit_b16, setup(448), "cuda:0") == 16


def _stitch_reference(crops, height, width, out_size):
    """The whole-stack slide-inference tail, as before class blocks: one canvas of every class."""
    num_classes = crops[0][1].shape[0]
    total, count = torch.zeros(1, num_classes, height, width), torch.zeros(1, 1, height, width)
    for (y1, x1, y2, x2), logits in crops:
        total[:, :, y1:y2, x1:x2] += F.interpolate(logits[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                   align_corners=False)
        count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(total / count, size=out_size, mode="bilinear", align_corners=False)[0].argmax(0)


@pytest.mark.parametrize("height,width,out_size,crop,stride", [
    (448, 598, (512, 683), 448, 224),  # ADE-150's usual image: two windows
    (200, 150, (180, 141), 128, 64),   # six overlapping windows, downsampled to the label
    (61, 45, (37, 53), 32, 16),        # small resizes: PyTorch's channel-vectorised kernel, whole stack
])
def test_stitching_over_class_blocks_equals_the_whole_stack(height, width, out_size, crop, stride):
    """Every pixel the same for any block of classes, with exact ties (duplicated classes: the first
    wins, as argmax's) and with NaN logits (argmax's NaN rule)."""
    gen = torch.Generator().manual_seed(0)
    num_classes, crops = 23, []
    for y1, x1, y2, x2 in zs_seg.slide_windows(height, width, crop, stride):
        logits = torch.randn(num_classes, max(1, (y2 - y1) // 16), max(1, (x2 - x1) // 16), generator=gen)
        top = logits.amax(0)
        logits[3] = top + 0.05 * torch.randn(top.shape, generator=gen)  # 3 and 11 win most pixels
        logits[11] = top + 0.05 * torch.randn(top.shape, generator=gen)
        logits[[5, 17]] = logits[3].clone()  # classes 3, 5 and 17 tie everywhere: 3 must win
        crops.append(((y1, x1, y2, x2), logits))
    blocked = zs_seg.resized_per_class(zs_seg.stitch_resizes(crops, height, width, out_size))
    assert blocked == (height > 100)  # small resizes are done on the whole stack
    expected = _stitch_reference(crops, height, width, out_size)
    assert (expected == 3).any() and (expected == 11).any()
    if blocked:  # the whole stack resizes each class alone too: the duplicates tie exactly
        assert not (expected == 5).any() and not (expected == 17).any()
    for block in (1, 2, 3, 7, 10, 22, 23, None):  # 10: a second block of 13 folds by max
        got = zs_seg.stitch_and_argmax(crops, height, width, out_size, block)
        assert torch.equal(got, expected), f"block {block}: {(got != expected).sum().item()} pixels differ"
    crops[0][1][7, 0, 0] = float("nan")
    expected = _stitch_reference(crops, height, width, out_size)
    assert (expected == 7).any()
    for block in (1, 7, None):
        assert torch.equal(zs_seg.stitch_and_argmax(crops, height, width, out_size, block), expected)


def test_bf16_crops_stitch_like_the_whole_stack():
    """Under --precision bf16 the patch logits are bf16: upsampled in bf16, summed in fp32, as before."""
    gen = torch.Generator().manual_seed(2)
    crops = [(box, torch.randn(23, 8, 8, generator=gen).to(torch.bfloat16))
             for box in zs_seg.slide_windows(200, 150, 128, 64)]
    expected = _stitch_reference(crops, 200, 150, (180, 141))
    for block in (1, 5, 7, None):
        assert torch.equal(zs_seg.stitch_and_argmax(crops, 200, 150, (180, 141), block), expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_class_blocks_cover_every_class_and_never_hold_three(threads):
    """On one thread PyTorch resizes exactly 3 channels with its channel-vectorised kernel."""
    for num_classes in (1, 3, 4, 7, 23, 150, 171):
        for block in (None, 1, 2, 3, 4, 5, 10, 149, 150, 200):
            blocks = zs_seg.class_blocks(num_classes, block)
            assert [c for c0, c1 in blocks for c in range(c0, c1)] == list(range(num_classes))
            assert len(blocks) == 1 or all(c1 - c0 != 3 for c0, c1 in blocks)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = torch.randn(23, 12, 9, generator=torch.Generator().manual_seed(1))
        logits[4] = logits.amax(0) + 0.1
        logits[[9, 20, 21, 22]] = logits[4].clone()  # exact ties with 4 unless a resize rounds them apart
        crops = [((0, 0, 200, 150), logits)]
        expected = _stitch_reference(crops, 200, 150, (180, 141))
        assert (expected == 4).all()
        for block in (3, 5, 10):  # 23 = 5 + 5 + 5 + 5 + 3 and 10 + 10 + 3: the last 3 are folded
            assert torch.equal(zs_seg.stitch_and_argmax(crops, 200, 150, (180, 141), block), expected)
    finally:
        torch.set_num_threads(previous)


def test_stitch_blocks_fit_the_cpu_cache_and_are_whole_on_an_accelerator():
    per_class = 4 * (448 * 598 + 512 * 683)
    assert zs_seg.stitch_block_size(150, 448, 598, (512, 683), "cpu") == zs_seg.CPU_STITCH_BLOCK_BYTES // per_class
    assert zs_seg.stitch_block_size(150, 4000, 4000, (4000, 4000), "cpu") == 1
    assert zs_seg.stitch_block_size(150, 448, 598, (512, 683), "meta") == 150
