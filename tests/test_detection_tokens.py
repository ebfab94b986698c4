"""`detection_tokens` (what OWL heads read) for every checkpoint format: the global token, through the
model's own pooling head and projection, is `encode_image`; the patch tokens, through the
projection, are the "tokens" dense mode. So both are the tower's final-norm tokens, nothing else."""
import pytest
import torch

from silc_bench.checkpoints.open_clip import OpenClipModel
from silc_bench.models.two_tower import BigVisionModel, TwoTower

TOL = dict(rtol=1e-4, atol=1e-5)


def _px(size=32, b=2):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("pool", ["map", "tok"])
def test_big_vision(tiny_config, sp_model_path, pool):
    from silc_bench.tokenizers import SentencePieceTokenizer

    model = BigVisionModel(TwoTower.from_config(tiny_config(pool_type=pool), seed=0),
                           SentencePieceTokenizer(str(sp_model_path), context_length=16)).eval()
    px = _px(40)  # 5 x 5 patches: position embeddings resampled
    with torch.no_grad():
        patches, glob, kind = model.detection_tokens(px)
        vit = model.model.img
        assert kind == {"map": "map", "tok": "cls"}[pool] and patches.shape == (2, 5, 5, 32)
        torch.testing.assert_close(vit._project(glob), model.encode_image(px), **TOL)
        if pool == "tok":
            torch.testing.assert_close(vit._project(patches), model.dense_features(px, "tokens"), **TOL)


def test_open_clip_vit():
    from test_open_clip_models import _tiny

    model = _tiny()
    wrapped = OpenClipModel.from_module(model, "tiny")
    px = _px()
    with torch.no_grad():
        patches, glob, kind = wrapped.detection_tokens(px)
        assert kind == "cls"
        torch.testing.assert_close(glob @ model.visual.proj, wrapped.encode_image(px), **TOL)
        torch.testing.assert_close(patches @ model.visual.proj, wrapped.dense_features(px, "tokens"), **TOL)


@pytest.mark.parametrize("trunk_kwargs", [dict(class_token=False), dict(class_token=True, reg_tokens=1)])
def test_open_clip_timm_map(trunk_kwargs):
    from test_open_clip_models import _timm_map_model

    model = _timm_map_model(**trunk_kwargs)
    wrapped = OpenClipModel.from_module(model, "tiny-siglip")
    t, head = model.visual.trunk, model.visual.head
    px = _px()
    with torch.no_grad():
        patches, glob, kind = wrapped.detection_tokens(px)
        assert kind == "map" and patches.shape[1:3] == (4, 4)  # the MAP pool, even beside a class token
        torch.testing.assert_close(head(t.head(t.fc_norm(glob))), wrapped.encode_image(px), **TOL)
        torch.testing.assert_close(head(t.head(t.fc_norm(patches))), wrapped.dense_features(px, "tokens"), **TOL)


def test_hf_clip_and_siglip(tmp_path_factory):
    from test_hf_models import clip_dir, siglip_dir  # noqa: F401  (fixtures, called directly below)

    from silc_bench.checkpoints.hf import load_hf
    for make in (clip_dir.__wrapped__, siglip_dir.__wrapped__):
        model = load_hf(make(tmp_path_factory))
        px = _px()
        with torch.no_grad():
            patches, glob, kind = model.detection_tokens(px)
            if model.model_type == "clip":
                assert kind == "cls"
                proj = model.model.visual_projection
                torch.testing.assert_close(proj(glob), model.encode_image(px), **TOL)
                torch.testing.assert_close(proj(patches), model.dense_features(px, "tokens"), **TOL)
            else:
                assert kind == "map"
                torch.testing.assert_close(glob, model.encode_image(px), **TOL)
                torch.testing.assert_close(patches, model.dense_features(px, "tokens"), **TOL)
