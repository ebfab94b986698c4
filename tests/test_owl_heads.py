"""OWL detection heads, box bias and post-processing equal transformers' Owlv2ForObjectDetection on a
random-weight save_pretrained model loaded through our `hf:` path (silc_bench/checkpoints/owl.py)."""
import pytest
import torch
from torchvision.ops import box_convert
from transformers import Owlv2Config, Owlv2ForObjectDetection

from silc_bench.checkpoints.owl import load_owl
from silc_bench.detection import owl
from silc_bench.errors import UserError
from test_hf_models import _perturb, write_clip_tokenizer

TOL = dict(rtol=1e-4, atol=1e-5)
QUERIES = ["a photo of a cat", "the dog", "a photo of the cat"]


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("owlv2")
    vocab = write_clip_tokenizer(d)
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    cfg = Owlv2Config(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                       bos_token_id=sot, eos_token_id=eot, pad_token_id=0),
                      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=64, patch_size=16),
                      projection_dim=32)
    model = _perturb(Owlv2ForObjectDetection(cfg))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pair(owl_dir):
    ref = Owlv2ForObjectDetection.from_pretrained(str(owl_dir), use_safetensors=True).eval()
    return ref, load_owl(f"hf:{owl_dir}")


def _pixels(b=2, size=64, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_box_bias_equals_transformers():
    for h, w in [(4, 4), (3, 5), (60, 60)]:
        ref = Owlv2ForObjectDetection.compute_box_bias(Owlv2ForObjectDetection, h, w)
        torch.testing.assert_close(owl.box_bias(h, w), ref, rtol=0, atol=0)
    # the last row / column: logit(1.0) with eps is log(1.0001 / 1e-4), corners not centres
    assert owl.box_bias(4, 4)[-1, 0].item() == pytest.approx(9.2104, abs=1e-3)


def test_heads_equal_transformers(pair):
    ref, det = pair
    pixels = _pixels()
    ids = det.backbone.tokenize(QUERIES)
    with torch.inference_mode():
        r = ref(input_ids=ids.repeat(2, 1), pixel_values=pixels, attention_mask=(ids > 0).long().repeat(2, 1))
        ours = det(pixels, det.text_queries(QUERIES))
    assert det.global_token_kind == "cls" and det.merge == "mul-ln"
    torch.testing.assert_close(ours["features"], r.image_embeds, **TOL)
    torch.testing.assert_close(ours["boxes"], r.pred_boxes, **TOL)
    torch.testing.assert_close(ours["logits"], r.logits, **TOL)
    torch.testing.assert_close(ours["objectness"], r.objectness_logits, **TOL)


def test_query_mask_and_batched_queries(pair):
    ref, det = pair
    pixels = _pixels(b=1)
    q = det.text_queries(QUERIES)[None]
    with torch.inference_mode():
        masked = det(pixels, q, torch.tensor([[True, False, True]]))["logits"]
        plain = det(pixels, q)["logits"]
    assert bool((masked[..., 1] == torch.finfo(masked.dtype).min).all())
    torch.testing.assert_close(masked[..., [0, 2]], plain[..., [0, 2]], rtol=0, atol=0)


def test_exemplar_query_equals_transformers_image_guided(pair):
    ref, det = pair
    pixels = _pixels(b=1, seed=3)
    with torch.inference_mode():
        fmap = ref.image_embedder(pixel_values=pixels)[0]
        feats = fmap.reshape(1, -1, fmap.shape[-1])
        want, _, _ = ref.embed_image_query(feats, fmap)
        got = owl.image_exemplar_query(det, pixels)
    torch.testing.assert_close(got, want[0, 0], **TOL)
    with torch.inference_mode():  # with a box: one of the patches' class embeddings
        boxed = owl.image_exemplar_query(det, pixels, torch.tensor([0.0, 0.0, 0.5, 0.5]))
        embeds = det(pixels)["class_embeds"][0]
    assert bool((embeds == boxed).all(dim=-1).any())


def test_post_processing_equals_transformers(pair):
    from transformers import Owlv2ImageProcessor

    ref, det = pair
    pixels = _pixels(b=1, seed=5)
    ids = det.backbone.tokenize(QUERIES)
    with torch.inference_mode():
        r = ref(input_ids=ids, pixel_values=pixels, attention_mask=(ids > 0).long())
        ours = det(pixels, det.text_queries(QUERIES))
    h, w = 30, 50  # the original image, padded to a 50 x 50 square before resizing
    hf = Owlv2ImageProcessor().post_process_object_detection(r, threshold=0.45, target_sizes=[(w, w)])[0]
    scores, labels, boxes = owl.exclusive_detections(ours["logits"][0], ours["boxes"][0], threshold=0.45)
    assert len(scores) > 0
    torch.testing.assert_close(scores, hf["scores"], **TOL)
    assert torch.equal(labels, hf["labels"])
    xyxy = hf["boxes"].clone()
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    torch.testing.assert_close(owl.boxes_to_image_xywh(boxes, h, w), box_convert(xyxy, "xyxy", "xywh"), **TOL)


def test_top_k_is_global_over_patches_and_classes():
    logits = torch.tensor([[0.0, 3.0], [2.0, 1.0], [-1.0, 4.0]])
    boxes = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    scores, labels, kept = owl.top_k_detections(logits, boxes, k=4)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    assert labels.tolist() == [1, 1, 0, 1]
    assert kept[:, 0].tolist() == [8.0, 0.0, 4.0, 4.0]  # patch 1 is emitted twice, with two labels
    assert len(owl.top_k_detections(logits, boxes, k=300)[0]) == 6


def test_resize_with_pad_pads_bottom_right_with_zero():
    img = torch.full((3, 30, 60), 255, dtype=torch.uint8)
    out = owl.resize_with_pad(img, 40)
    assert out.shape == (3, 40, 40)
    assert torch.all(out[:, :20] == 1.0) and torch.all(out[:, 20:] == 0.0)


def test_untrained_heads_are_labelled_and_plain_models_refused(tmp_path):
    from silc_bench.checkpoints import get_loader

    det = get_loader("owl")("untrained:toy-clip")
    assert det.provenance["heads"] == "untrained" and det.global_token_kind is None
    with pytest.raises(UserError, match="no detection heads"):
        load_owl("toy-clip")


def test_released_owlv2_runs_through_the_ov_det_runner(owl_dir, tmp_path):
    from silc_bench import runner
    from silc_bench.data.fixtures_detection import write_coco_detection

    write_coco_detection(tmp_path / "data", num_images=3)
    opts = runner.RunOptions(data_root=str(tmp_path / "data"), out_dir=tmp_path / "runs", progress=False,
                             protocol_overrides={"input_size": 64, "templates": "a_photo_of", "top_k": 20})
    (record,) = runner.run("ov-det", [f"hf:{owl_dir}"], ["coco"], opts)
    assert record["model"]["heads"] == "released (hf Owlv2ForObjectDetection)"
    assert record["model"]["global_token"] == "cls" and record["model"]["backbone"]["model_type"] == "owlv2"
    assert record["metrics"]["num_detections"] == 3 * 20 and 0 <= record["metrics"]["AP"] <= 100
