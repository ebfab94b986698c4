"""big_vision two-tower checkpoints: values against open_clip and transformers, layouts, errors.

Checkpoints are random-weight files written in big_vision layout. References read the same weights
on their own: open_clip through its `load_big_vision_weights` (which reads the .npz itself) and
transformers' `SiglipModel` through a converter written here from the big_vision key names.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from silc_bench.checkpoints.big_vision import (
    infer_config, load_big_vision, param_specs, read_npz, save_big_vision, state_dict_to_params, write_npz,
)
from silc_bench.errors import UserError
from silc_bench.models.base import VisionLanguageModel
from silc_bench.models.two_tower import BigVisionModel, TwoTower
from silc_bench.models.vit import resample_grid

LAYOUTS = [
    dict(layout="pyloop", prefix=False, bf16=False),
    dict(layout="scan", prefix=False, bf16=False),
    dict(layout="pyloop", prefix=True, bf16=False),
    dict(layout="scan", prefix=True, bf16=True),
    dict(layout="pyloop", prefix=False, bf16=True),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def random_params(cfg, seed=0) -> dict[str, np.ndarray]:
    """Random big_vision params with non-trivial LayerNorms and biases (fan-in scaled kernels)."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, _, kind, shape in param_specs(cfg):
        leaf = key.rsplit("/", 1)[-1]
        if leaf == "scale":
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif leaf == "bias" and key not in ("b",):
            a = 0.1 * rng.standard_normal(shape)
        elif kind == "conv":
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:3]))
        elif kind in ("qkv", "dense"):
            a = rng.standard_normal(shape) / np.sqrt(shape[0])
        elif kind == "out":
            a = rng.standard_normal(shape) / np.sqrt(shape[0] * shape[1])
        else:  # pos_embedding, cls, probe, Embed_0
            a = 0.5 * rng.standard_normal(shape)
        params[key] = a.astype(np.float32)
    params["t"] = np.array([np.log(10.0)], np.float32)
    if cfg.bias:
        params["b"] = np.array([-10.0], np.float32)
    return params


def bf16_round(params):
    return {k: torch.from_numpy(v).to(torch.bfloat16).to(torch.float32).numpy() for k, v in params.items()}


# ------------------------------------------------------------------ references


def openclip_model(npz_path, cfg):
    """open_clip CustomTextCLIP (timm SigLIP-style trunk) filled by open_clip's own big_vision loader."""
    import timm
    from open_clip.convert import load_big_vision_weights
    from open_clip.model import CustomTextCLIP
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    c, t = cfg.img, cfg.txt
    name = f"silc_bench_test_vit_w{c.width}_d{c.depth}_h{c.heads}_m{c.mlp}_p{c.patch_size}_g{c.grid[0]}"
    if not timm.is_model(name):
        def build(pretrained=False, num_classes=0, global_pool="map", **_):
            return VisionTransformer(num_classes=num_classes, global_pool=global_pool,
                img_size=c.grid[0] * c.patch_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                num_heads=c.heads, mlp_ratio=c.mlp / c.width, class_token=False, act_layer="gelu_tanh")
        build.__name__ = name
        register_model(build)
    model = CustomTextCLIP(
        embed_dim=t.out_dim,
        vision_cfg=dict(image_size=c.grid[0] * c.patch_size, timm_model_name=name, timm_model_pretrained=False,
                        timm_pool="map", timm_proj="none"),
        text_cfg=dict(context_length=t.length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.depth, mlp_ratio=t.mlp / t.width, no_causal_mask=True, proj_bias=True,
                      pool_type="last", norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"}),
        init_logit_bias=-10.0,
    )
    load_big_vision_weights(model, str(npz_path))
    return model.eval()


def hf_state_dict(p: dict[str, np.ndarray], depth_img: int, depth_txt: int) -> dict[str, torch.Tensor]:
    """big_vision params -> transformers SiglipModel state dict (written here, independently)."""
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731

    def attn(bv, hf, d):
        out = {}
        for n, m in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{hf}{m}.weight"] = T(p[f"{bv}{n}/kernel"].reshape(d, -1).T)
            out[f"{hf}{m}.bias"] = T(p[f"{bv}{n}/bias"].reshape(-1))
        out[f"{hf}out_proj.weight"] = T(p[f"{bv}out/kernel"].reshape(-1, d).T)
        out[f"{hf}out_proj.bias"] = T(p[f"{bv}out/bias"])
        return out

    def ln(bv, hf):
        return {f"{hf}.weight": T(p[f"{bv}/scale"]), f"{hf}.bias": T(p[f"{bv}/bias"])}

    def mlp(bv, hf):
        return {f"{hf}.fc1.weight": T(p[f"{bv}/Dense_0/kernel"].T), f"{hf}.fc1.bias": T(p[f"{bv}/Dense_0/bias"]),
                f"{hf}.fc2.weight": T(p[f"{bv}/Dense_1/kernel"].T), f"{hf}.fc2.bias": T(p[f"{bv}/Dense_1/bias"])}

    def encoder(bv, hf, depth, d):
        sd = {}
        for i in range(depth):
            b, h = f"{bv}encoderblock_{i}/", f"{hf}layers.{i}."
            sd |= ln(b + "LayerNorm_0", h + "layer_norm1") | ln(b + "LayerNorm_1", h + "layer_norm2")
            sd |= attn(b + "MultiHeadDotProductAttention_0/", h + "self_attn.", d) | mlp(b + "MlpBlock_0", h + "mlp")
        return sd

    d = p["img/embedding/kernel"].shape[-1]
    sd = {"vision_model.embeddings.patch_embedding.weight": T(p["img/embedding/kernel"].transpose(3, 2, 0, 1)),
          "vision_model.embeddings.patch_embedding.bias": T(p["img/embedding/bias"]),
          "vision_model.embeddings.position_embedding.weight": T(p["img/pos_embedding"][0])}
    sd |= encoder("img/Transformer/", "vision_model.encoder.", depth_img, d)
    sd |= ln("img/Transformer/encoder_norm", "vision_model.post_layernorm")
    mh = "img/MAPHead_0/MultiHeadDotProductAttention_0/"
    sd["vision_model.head.probe"] = T(p["img/MAPHead_0/probe"])
    sd["vision_model.head.attention.in_proj_weight"] = torch.cat(
        [T(p[f"{mh}{n}/kernel"].reshape(d, -1).T) for n in ("query", "key", "value")])
    sd["vision_model.head.attention.in_proj_bias"] = torch.cat(
        [T(p[f"{mh}{n}/bias"].reshape(-1)) for n in ("query", "key", "value")])
    sd["vision_model.head.attention.out_proj.weight"] = T(p[f"{mh}out/kernel"].reshape(-1, d).T)
    sd["vision_model.head.attention.out_proj.bias"] = T(p[f"{mh}out/bias"])
    sd |= ln("img/MAPHead_0/LayerNorm_0", "vision_model.head.layernorm") | mlp("img/MAPHead_0/MlpBlock_0", "vision_model.head.mlp")
    dt = p["txt/Embed_0/embedding"].shape[-1]
    sd["text_model.embeddings.token_embedding.weight"] = T(p["txt/Embed_0/embedding"])
    sd["text_model.embeddings.position_embedding.weight"] = T(p["txt/pos_embedding"][0])
    sd |= encoder("txt/Encoder_0/", "text_model.encoder.", depth_txt, dt)
    sd |= ln("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
    sd["text_model.head.weight"] = T(p["txt/head/kernel"].T)
    sd["text_model.head.bias"] = T(p["txt/head/bias"])
    sd["logit_scale"], sd["logit_bias"] = T(p["t"]), T(p["b"])
    return sd


def hf_model(params, cfg):
    from transformers import SiglipConfig, SiglipModel

    c, t = cfg.img, cfg.txt
    config = SiglipConfig(
        vision_config=dict(hidden_size=c.width, intermediate_size=c.mlp, num_hidden_layers=c.depth,
                           num_attention_heads=c.heads, image_size=c.grid[0] * c.patch_size, patch_size=c.patch_size),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp,
                         num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=t.length,
                         projection_size=t.out_dim, bos_token_id=None, eos_token_id=1, pad_token_id=1),
    )
    model = SiglipModel(config).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(params, c.depth, t.depth), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def _pooled(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output


@pytest.fixture(scope="module")
def siglip_case(tiny_config, sp_model_path):
    cfg = tiny_config()
    return cfg, random_params(cfg, seed=1), {"kind": "sentencepiece", "file": str(sp_model_path)}


@pytest.mark.parametrize("opts", LAYOUTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_embeddings_match_open_clip_and_transformers(tmp_path, siglip_case, opts):
    cfg, params, tok = siglip_case
    path = tmp_path / "siglip.npz"
    write_npz(params, path, **opts)
    model = load_big_vision(path, tokenizer=tok)
    ref_params = bf16_round(params) if opts["bf16"] else params
    assert model.provenance["dtype"] == ("bfloat16" if opts["bf16"] else "float32")
    assert model.provenance["layout"] == opts["layout"]

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    pixels = model.preprocess.normalize(images)  # SigLIP: [0, 1] -> [-1, 1]
    ids = torch.randint(0, cfg.txt.vocab_size, (3, cfg.txt.length), generator=g)
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(pixels), model.encode_text(ids)

        # open_clip reads the file itself (it cannot read V2 arrays: give it the rounded float32 weights).
        oc_path = path
        if opts["bf16"]:
            oc_path = tmp_path / "rounded_f32.npz"
            write_npz(ref_params, oc_path, layout=opts["layout"], prefix=opts["prefix"])
        oc = openclip_model(oc_path, cfg)
        assert rel_err(ours_img, oc.encode_image(pixels)) < 1e-5
        assert rel_err(ours_txt, oc.encode_text(ids)) < 1e-5

        hf = hf_model(ref_params, cfg)
        assert rel_err(ours_img, _pooled(hf.get_image_features(pixel_values=pixels))) < 1e-5
        assert rel_err(ours_txt, _pooled(hf.get_text_features(input_ids=ids))) < 1e-5
        assert model.logit_scale == pytest.approx(float(hf.logit_scale.exp()), rel=1e-6)
        assert model.logit_bias == pytest.approx(float(hf.logit_bias), rel=1e-6)


def test_preprocess_matches_siglip_image_processor(siglip_case, tmp_path):
    from transformers import SiglipImageProcessor

    cfg, params, tok = siglip_case
    write_npz(params, tmp_path / "m.npz")
    model = load_big_vision(tmp_path / "m.npz", tokenizer=tok)
    assert model.preprocess.image_size == (32, 32) and model.preprocess.resize == "squash"
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = SiglipImageProcessor(do_resize=False)(images=img, return_tensors="pt")["pixel_values"]
    ours = model.preprocess.normalize(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    assert torch.allclose(ours, ref.float(), atol=1e-6)


# ------------------------------------------------------------------ dense paths


def test_map_value_equals_map_head_on_each_token_alone(tiny_config, sp_model_path):
    cfg = tiny_config(out_dim=24)
    tower = TwoTower.from_config(cfg, seed=3).eval()
    gen = torch.Generator().manual_seed(0)  # not the global RNG: the draw must not depend on the tests run before
    with torch.no_grad():  # non-trivial LayerNorms/biases in the MAP head
        for p in tower.img.map_head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model = BigVisionModel(tower, tokenizer=None)
    assert model.default_dense_mode == "map_value"
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        dense = model.dense_features(pixels)
        no_mlp = model.dense_features(pixels, "map_value_no_mlp")
        tokens = model.dense_features(pixels, "tokens")
        x = tower.img(pixels)[1]["encoded"]  # encoder-normed tokens
        head = tower.img.map_head
        loop, loop_no_mlp = [], []
        for i in range(x.shape[1]):
            xi = x[:, i:i + 1]
            loop.append(tower.img.head(head(xi)))
            loop_no_mlp.append(tower.img.head(head.attn(head.probe.expand(2, -1, -1), xi)[:, 0]))
    assert dense.shape == (2, 4, 4, 24)
    # Batched and per-token sums round differently in fp32: features reach ~6 here and differ by up to
    # ~2e-6 (22 of 300 random draws exceeded atol=1e-6); the other dense modes differ from it by up to ~3.
    torch.testing.assert_close(dense, torch.stack(loop, 1).reshape(2, 4, 4, 24), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_mlp, torch.stack(loop_no_mlp, 1).reshape(2, 4, 4, 24), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, tower.img.head(x).reshape(2, 4, 4, 24))
    with pytest.raises(ValueError):
        model.dense_features(pixels, "bogus")


def test_tok_and_gap_models_offer_tokens_only(tiny_config):
    for pool in ("tok", "gap"):
        tower = TwoTower.from_config(tiny_config(pool_type=pool, out_dim=16), seed=0).eval()
        model = BigVisionModel(tower, tokenizer=None)
        assert model.dense_modes == ("tokens",) and model.default_dense_mode == "tokens"
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            enc = tower.img(pixels)[1]["encoded"]
            patches = enc[:, 1:] if pool == "tok" else enc
            torch.testing.assert_close(model.dense_features(pixels), tower.img.head(patches).reshape(1, 4, 4, 16))
            emb = model.encode_image(pixels)
            torch.testing.assert_close(emb, tower.img.head(enc[:, 0] if pool == "tok" else enc.mean(1)))


# ------------------------------------------------------------------ position embeddings


@pytest.mark.parametrize("new", [(6, 6), (3, 3), (7, 5), (1, 1)])
def test_bilinear_resample_equals_big_vision_scipy_zoom(new):
    ndimage = pytest.importorskip("scipy.ndimage")
    old = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)
    grid = old.reshape(4, 4, 8)
    ref = ndimage.zoom(grid, (new[0] / 4, new[1] / 4, 1), order=1).reshape(1, -1, 8)
    ours = resample_grid(torch.from_numpy(old), (4, 4), new, "bilinear").numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bicubic_resample_equals_open_clip_style():
    import torch.nn.functional as F

    old = torch.randn(1, 16, 8)
    ours = resample_grid(old, (4, 4), (6, 6), "bicubic")
    grid = old.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1).reshape(1, 36, 8))


def test_posemb_cache_per_grid_in_eval_only(tiny_config):
    tower = TwoTower.from_config(tiny_config(), seed=0)
    vit = tower.img.eval()
    with torch.no_grad():
        a = vit.posemb((6, 6))
        assert vit.posemb((6, 6)) is a and vit.posemb((4, 4)) is vit.pos_embedding
        vit.pos_embedding.add_(1.0)  # new weights invalidate the cache
        b = vit.posemb((6, 6))
        assert b is not a and not torch.equal(a, b)
    vit.train()
    assert vit.posemb((6, 6)) is not vit.posemb((6, 6))
    assert vit.dense(torch.randn(1, 3, 48, 40)).shape == (1, 6, 5, 32)


# ------------------------------------------------------------------ inference, round trips, errors


ARCHS = [
    dict(),
    dict(pool_type="tok", out_dim=24, width=48, heads=3, mlp_dim=96, patch_size=4, grid=(8, 8), depth=3),
    dict(pool_type="gap", out_dim=16, depth=1, grid=(2, 2), patch_size=16),
    dict(pool_type="map", out_dim=40, width=64, heads=4, mlp_dim=128),
]


@pytest.mark.parametrize("img_kw", ARCHS)
@pytest.mark.parametrize("bias", [True, False])
def test_infer_config(tmp_path, tiny_config, img_kw, bias):
    cfg = tiny_config(**img_kw)
    cfg.bias = bias
    cfg.txt.vocab_size, cfg.txt.length, cfg.txt.depth = 100 + len(img_kw), 8 + len(img_kw), 1 + bias
    params = random_params(cfg)
    params["some_extra_top_level"] = np.zeros(3, np.float32)  # ignored
    write_npz(params, tmp_path / "m.npz", layout="scan")
    got = infer_config(read_npz(tmp_path / "m.npz"), tmp_path / "m.npz")
    assert got.img == cfg.img and got.txt == cfg.txt and got.bias == bias


@pytest.mark.parametrize("opts", LAYOUTS, ids=str)
def test_write_read_round_trip(tmp_path, tiny_config, opts):
    cfg = tiny_config(pool_type="tok", out_dim=16)
    params = random_params(cfg, seed=2)
    write_npz(params, tmp_path / "m.npz", **opts)
    raw = np.load(tmp_path / "m.npz", allow_pickle=False)
    pre = "params/" if opts["prefix"] else ""
    key = f"{pre}img/Transformer/encoderblock/LayerNorm_0/scale" if opts["layout"] == "scan" else \
        f"{pre}img/Transformer/encoderblock_1/LayerNorm_0/scale"
    assert key in raw.files and (raw[key].dtype == np.dtype("V2")) == opts["bf16"]
    back = read_npz(tmp_path / "m.npz")
    want = bf16_round(params) if opts["bf16"] else params
    assert back.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    # load -> save -> read returns the same params too
    model = load_big_vision(tmp_path / "m.npz", tokenizer=_dummy_tok(cfg))
    save_big_vision(model.model, tmp_path / "again.npz")
    again = read_npz(tmp_path / "again.npz")
    for k in want:
        np.testing.assert_array_equal(again[k], want[k], err_msg=k)


class _Tok:
    def __init__(self, n):
        self.context_length = n

    def __call__(self, texts):
        return torch.ones(len(texts), self.context_length, dtype=torch.long)

    def describe(self):
        return {"kind": "dummy"}


def _dummy_tok(cfg):
    from silc_bench.models.base import Tokenizer

    Tokenizer.register(_Tok)
    return _Tok(cfg.txt.length)


def test_save_with_sidecar_and_load(tmp_path, tiny_config, sp_model_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "sp.model").write_bytes(sp_model_path.read_bytes())
    tower = TwoTower.from_config(tiny_config(), seed=0)
    path = tmp_path / "m.npz"
    save_big_vision(tower, path, tokenizer={"kind": "sentencepiece", "file": "tok/sp.model", "pad_id": 1},
                    layout="scan", prefix=True, bf16=True)
    assert json.loads((tmp_path / "m.npz.json").read_text())["tokenizer"]["file"] == "tok/sp.model"
    model = load_big_vision(path, posemb_resample="bicubic")  # relative file: relative to the sidecar
    assert isinstance(model, VisionLanguageModel)
    d = model.describe()
    assert d["format"] == "big_vision" and d["layout"] == "scan" and d["dtype"] == "bfloat16"
    assert d["posemb_resample"] == "bicubic" and len(d["sha256"]) == 64 and d["config"]["img"]["width"] == 32
    assert d["tokenizer"]["context_length"] == 16 and d["tokenizer"]["pad_id"] == 1
    assert model.tokenize(["a photo of a cat"]).shape == (1, 16)
    assert model.logit_scale == pytest.approx(10.0, rel=1e-2) and model.logit_bias == pytest.approx(-10.0)
    assert model.encode_text(model.tokenize(["a cat", "a dog"])).shape == (2, 32)
    # the CLI's `--tokenizer sentencepiece:FILE` dict leaves context_length None: the checkpoint's is used
    flag = {"kind": "sentencepiece", "file": str(sp_model_path), "context_length": None, "pad_id": 1,
            "lowercase": True, "eos": "sticky"}
    assert load_big_vision(path, tokenizer=flag).tokenizer.context_length == 16
    with pytest.raises(UserError, match="context_length"):
        load_big_vision(path, tokenizer=dict(flag, context_length=8))


def test_missing_key_raises_user_error(tmp_path, tiny_config):
    cfg = tiny_config()
    params = random_params(cfg)
    key = "img/Transformer/encoderblock_1/LayerNorm_1/scale"
    del params[key]
    path = tmp_path / "broken.npz"
    write_npz(params, path, layout="pyloop")
    with pytest.raises(UserError) as e:
        load_big_vision(path, tokenizer=_dummy_tok(cfg))
    assert key in str(e.value) and str(path) in str(e.value)


def test_misshaped_key_raises_user_error(tmp_path, tiny_config):
    cfg = tiny_config()
    params = random_params(cfg)
    key = "txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias"
    params[key] = np.zeros(7, np.float32)
    path = tmp_path / "broken.npz"
    write_npz(params, path)
    with pytest.raises(UserError) as e:
        load_big_vision(path, tokenizer=_dummy_tok(cfg))
    msg = str(e.value)
    assert key in msg and str(path) in msg and "(7,)" in msg and "(32,)" in msg


def test_missing_tokenizer_raises_user_error_with_fix(tmp_path, tiny_config):
    path = tmp_path / "m.npz"
    write_npz(random_params(tiny_config()), path)
    with pytest.raises(UserError) as e:
        load_big_vision(path)
    assert "--tokenizer sentencepiece:FILE" in str(e.value) and "m.npz.json" in str(e.value)


def test_bad_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_npz(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match="npz"):
        read_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(UserError, match="npz"):
        read_npz(tmp_path / "single.npy")
    np.savez(tmp_path / "partial.npz", **{"img/embedding/kernel": np.zeros((8, 8, 3, 32), np.float32)})
    with pytest.raises(UserError, match="img/Transformer"):
        infer_config(read_npz(tmp_path / "partial.npz"), tmp_path / "partial.npz")


def test_state_dict_round_trip_and_fixture(tiny_big_vision_npz):
    model = load_big_vision(tiny_big_vision_npz)  # tokenizer from the sidecar the fixture wrote
    params = state_dict_to_params(model.model.state_dict(), model.config)
    orig = read_npz(tiny_big_vision_npz)
    assert params.keys() == orig.keys()
    for k in params:
        np.testing.assert_array_equal(params[k], orig[k])
