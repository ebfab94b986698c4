"""open_clip checkpoints behind the interface, checked against open_clip's own forward passes.

Tiny random-weight models only. The MaskCLIP reference runs open_clip's own last block with an
attention mask that lets each token see only itself, which is MaskCLIP by definition.
"""
import copy
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from silc_bench.checkpoints.open_clip import OpenClipModel, load_open_clip
from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file

ARCH = "SilcTest-ViT-Tiny"
TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc_cfg") / f"{ARCH}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return ARCH


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tiny(vision_overrides=None, seed=0):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"].update(vision_overrides or {})
    return _perturb(open_clip.CLIP(**cfg), seed)


def _pixels(size, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def _bicubic(table, old, new, prefix):
    """Independent reference: resize the grid rows of a [P+N, D] table, keep the prefix rows."""
    head, grid = table[:prefix], table[prefix:]
    g = grid.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    g = torch.nn.functional.interpolate(g, size=new, mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([head, g.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1)], dim=0)


def _with_pos(model, grid):
    """A copy of an open_clip ViT CLIP whose position table fits `grid` (its forward then runs as is)."""
    ref = copy.deepcopy(model)
    v = ref.visual
    v.positional_embedding = torch.nn.Parameter(_bicubic(v.positional_embedding.data, v.grid_size, grid, 1))
    return ref


def _ref_dense(model, pixels, maskclip=True):
    """open_clip's own modules; MaskCLIP = last block with an identity attention mask."""
    v = model.visual
    x = v._embeds(pixels)
    blocks = v.transformer.resblocks
    bf = v.transformer.batch_first
    x = x if bf else x.transpose(0, 1)
    for blk in blocks[:-1]:
        x = blk(x)
    n = x.shape[1] if bf else x.shape[0]
    mask = torch.full((n, n), float("-inf")).fill_diagonal_(0.0) if maskclip else None
    x = blocks[-1](x, attn_mask=mask)
    x = x if bf else x.transpose(0, 1)
    x = v.ln_post(x[:, 1:]) @ v.proj
    g = int(round((x.shape[1]) ** 0.5))
    return x.reshape(x.shape[0], g, g, -1)


@pytest.mark.parametrize("overrides", [{}, {"ls_init_value": 0.5},
                                       {"scale_heads": True, "scale_attn": True, "scale_attn_inner": True}])
def test_vit_embeddings_and_maskclip_match_open_clip(overrides):
    model = _tiny(overrides)
    wrapped = OpenClipModel.from_module(model, ARCH)
    px = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.encode_image(px), model.encode_image(px, normalize=False), **TOL)
        ids = wrapped.tokenize(["a photo of a cat", "a dog"])
        assert ids.shape == (2, 16) and ids.dtype == torch.int64
        torch.testing.assert_close(ids, open_clip.tokenize(["a photo of a cat", "a dog"], context_length=16))
        torch.testing.assert_close(wrapped.encode_text(ids), model.encode_text(ids, normalize=False), **TOL)
        dense = wrapped.dense_features(px)
        assert dense.shape == (2, 4, 4, 24)
        torch.testing.assert_close(dense, _ref_dense(model, px), **TOL)
        torch.testing.assert_close(wrapped.dense_features(px, "tokens"), _ref_dense(model, px, False), **TOL)


def test_vit_larger_input_uses_bicubic_positions():
    model = _tiny()
    wrapped = OpenClipModel.from_module(model, ARCH)
    px = _pixels(48)
    ref = _with_pos(model, (6, 6))
    with torch.no_grad():
        dense = wrapped.dense_features(px)
        assert dense.shape == (2, 6, 6, 24)
        torch.testing.assert_close(dense, _ref_dense(ref, px), **TOL)
        torch.testing.assert_close(wrapped.dense_features(px, "tokens"), _ref_dense(ref, px, False), **TOL)
        torch.testing.assert_close(wrapped.encode_image(px), ref.encode_image(px, normalize=False), **TOL)
        # non-square input and a cached second call give the same answers
        px2 = _pixels(40)[..., :24]
        ref2 = copy.deepcopy(model)
        ref2.visual.positional_embedding = torch.nn.Parameter(
            _bicubic(model.visual.positional_embedding.data, (4, 4), (5, 3), 1))
        got = wrapped.encode_image(px2)
        torch.testing.assert_close(got, ref2.encode_image(px2, normalize=False), **TOL)
        torch.testing.assert_close(wrapped.encode_image(px2), got)
    assert (5, 3) in wrapped._pos_cache


def test_vit_sequence_first_blocks():
    """open_clip transformers may run sequence-first (batch_first=False); results must not change."""
    model = _tiny()
    px = _pixels(32)
    with torch.no_grad():
        expected = OpenClipModel.from_module(model, ARCH).dense_features(px)
        model.visual.transformer.batch_first = False
        for blk in model.visual.transformer.resblocks:
            blk.attn.batch_first = False
        wrapped = OpenClipModel.from_module(model, ARCH)
        torch.testing.assert_close(wrapped.dense_features(px), expected, **TOL)
        torch.testing.assert_close(wrapped.dense_features(px), _ref_dense(model, px), **TOL)
        torch.testing.assert_close(wrapped.encode_image(px), model.encode_image(px), **TOL)


def test_describe_and_logits():
    model = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    wrapped = OpenClipModel.from_module(model, ARCH)
    d = wrapped.describe()
    assert d["format"] == "open_clip" and d["arch"] == ARCH
    assert d["tokenizer"]["kind"] == "open_clip" and d["tokenizer"]["class"] == "SimpleTokenizer"
    assert d["tokenizer"]["context_length"] == 16 and len(d["tokenizer"]["vocab_sha256"]) == 64
    assert d["preprocess"]["image_size"] == (32, 32) and d["preprocess"]["resize"] == "shortest"
    assert d["patch_size"] == 8
    assert wrapped.logit_scale == pytest.approx(float(torch.exp(torch.tensor(2.0))))
    assert wrapped.logit_bias is None
    assert wrapped.dense_modes == ("maskclip", "tokens") and wrapped.default_dense_mode == "maskclip"
    with pytest.raises(ValueError):
        wrapped.dense_features(_pixels(32), "map_value")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_from_file(registered, tmp_path, suffix):
    model = _perturb(open_clip.create_model(registered), seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    loaded = load_open_clip(registered, weights=path)
    assert loaded.provenance["sha256"] == sha256_file(path)
    assert loaded.provenance["weights"] == str(path) and loaded.provenance["format"] == "open_clip"
    px = _pixels(32)
    ids = loaded.tokenize(["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(px), model.encode_image(px), **TOL)
        torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids), **TOL)
        torch.testing.assert_close(loaded.dense_features(px), _ref_dense(model, px), **TOL)
    assert loaded.logit_scale == pytest.approx(float(torch.exp(torch.tensor(1.5))))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bad_weights(registered, tmp_path, capsys):
    with pytest.raises(UserError, match="does-not-exist.pt"):
        load_open_clip(registered, weights=tmp_path / "does-not-exist.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)  # loading it must not call print: weights_only refuses
    with pytest.raises(UserError, match="evil.pt"):
        load_open_clip(registered, weights=evil)
    assert "unpickled!" not in capsys.readouterr().out
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(UserError, match="wrong.safetensors"):
        load_open_clip(registered, weights=wrong)
    with pytest.raises(UserError, match="No-Such-Arch-xyz"):
        load_open_clip("No-Such-Arch-xyz")
    with pytest.raises(UserError, match="nowhere"):
        load_open_clip(f"local-dir:{tmp_path / 'nowhere'}")


def test_pretrained_tag_download_failure_is_user_error(monkeypatch):
    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    with pytest.raises(UserError, match="local path"):
        load_open_clip("ViT-B-32", weights="openai")


def test_resnet_tower_has_no_dense_path():
    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}
    model = open_clip.CLIP(**cfg).eval()
    wrapped = OpenClipModel.from_module(model, "tiny-rn")
    px = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.encode_image(px), model.encode_image(px))
    with pytest.raises(ValueError, match="ModifiedResNet"):
        wrapped.dense_features(px)


# ---- timm-backed towers with a MAP pool (open_clip's SigLIP models) -----------------------------
def _timm_map_model(**trunk_kwargs):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY_CFG)
    cfg["embed_dim"] = 32
    cfg["vision_cfg"] = {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "map", "timm_proj": "none",
                         "image_size": 32}
    cfg["init_logit_bias"] = -10.0
    model = open_clip.CLIP(**cfg)
    model.visual.trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           mlp_ratio=2.0, global_pool="map", num_classes=0, **trunk_kwargs)
    return _perturb(model)


def _ref_timm_dense(trunk, head, pixels, mode):
    x = trunk.forward_features(pixels)[:, trunk.num_prefix_tokens:]
    pool = copy.deepcopy(trunk.attn_pool)
    if mode == "map_value_no_mlp":
        pool.mlp = None
    if mode == "tokens":
        out = x
    else:  # the MAP head with its probe attending to one patch at a time
        out = torch.stack([pool(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
    out = head(trunk.head(trunk.fc_norm(out)))
    g = int(round(out.shape[1] ** 0.5))
    return out.reshape(out.shape[0], g, g, -1)


@pytest.mark.parametrize("trunk_kwargs", [dict(class_token=False),
                                          dict(class_token=True, reg_tokens=1, no_embed_class=True)])
def test_timm_map_tower(trunk_kwargs):
    model = _timm_map_model(**trunk_kwargs)
    wrapped = OpenClipModel.from_module(model, "tiny-siglip")
    assert wrapped.dense_modes == ("map_value", "map_value_no_mlp", "tokens")
    assert wrapped.logit_bias == pytest.approx(-10.0, abs=0.2)
    trunk, head = model.visual.trunk, model.visual.head
    px = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.encode_image(px), model.encode_image(px), **TOL)
        for mode in wrapped.dense_modes:
            torch.testing.assert_close(wrapped.dense_features(px, mode), _ref_timm_dense(trunk, head, px, mode), **TOL)
        # larger input: compare with a trunk whose table was resized independently
        big = _pixels(48)
        ref = copy.deepcopy(trunk)
        n_prefix = 0 if ref.no_embed_class else ref.num_prefix_tokens
        ref.pos_embed = torch.nn.Parameter(_bicubic(ref.pos_embed.data[0], (4, 4), (6, 6), n_prefix)[None])
        ref.patch_embed.strict_img_size = False
        got = wrapped.dense_features(big)
        assert got.shape == (2, 6, 6, 32)
        torch.testing.assert_close(got, _ref_timm_dense(ref, head, big, "map_value"), **TOL)
        torch.testing.assert_close(wrapped.encode_image(big), head(ref.forward_head(ref.forward_features(big))),
                                   **TOL)
