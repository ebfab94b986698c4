"""CAT-Seg model: shapes, what is trainable, the ViT-B/16 head size counted by hand, the top-256
rule, the backbones' new interface methods against their own references, and the attention pieces
against naive versions written here.

Tiny random backbones only (no downloads); the ViT-B/16 count builds open_clip's architecture with
random weights.
"""
import copy
import math
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F

from silc_bench.catseg.model import CatSeg, CatSegConfig, SwinBlock, linear_attention
from silc_bench.checkpoints.hf import HFModel
from silc_bench.checkpoints.open_clip import OpenClipModel
from silc_bench.models.base import OPENAI_MEAN, OPENAI_STD, Preprocess, Tokenizer
from silc_bench.models.two_tower import BigVisionModel, TwoTower

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors on 2 shared cores: intra-op threads only add contention (10-30x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_HEAD = dict(hidden_dim=16, num_heads=2, appearance_guidance_dim=8, text_guidance_dim=8, decoder_dims=[16, 16],
                 decoder_guidance_dims=[8, 8], decoder_guidance_proj_dims=[4, 4])


class FakeTokenizer(Tokenizer):
    """Deterministic ids from the characters: enough for structure tests."""

    def __init__(self, context_length=16, vocab=96):
        self.context_length, self.vocab = context_length, vocab

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [3 + ord(c) % (self.vocab - 3) for c in t][: self.context_length - 1] + [1]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def describe(self):
        return {"kind": "fake"}


def big_vision_backbone(tiny_config, **img):
    model = TwoTower.from_config(tiny_config(**img), seed=0)
    return BigVisionModel(model, FakeTokenizer())


OC_CFG = {"embed_dim": 24,
          "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0}}


def open_clip_backbone():
    torch.manual_seed(0)
    return OpenClipModel.from_module(open_clip.CLIP(**copy.deepcopy(OC_CFG)).eval(), "tiny-oc")


def hf_backbone(kind):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(text, bos_token_id=1, eos_token_id=2, pad_token_id=2),
                                     vision_config=vision, projection_dim=24))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    pre = Preprocess((32, 32), OPENAI_MEAN, OPENAI_STD)
    return HFModel(model.eval(), kind, FakeTokenizer(vocab=99), pre)


def pixels(size, b=1, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ shapes
def test_output_shape_at_384(tiny_config):
    backbone = big_vision_backbone(tiny_config, patch_size=16, grid=(24, 24))
    model = CatSeg(backbone, TINY_HEAD)
    d = model.describe()
    assert d["window_size"] == 12 and d["decoder_scales"] == [2, 2] and d["output_stride"] == 4
    with torch.no_grad():
        out = model(pixels(384), ["cat", "dog", "sky"])
    assert out.shape == (1, 3, 96, 96) and torch.isfinite(out).all()


def test_toy_patch8_backbone_gives_quarter_resolution(tiny_config):
    model = CatSeg(big_vision_backbone(tiny_config, patch_size=8, grid=(8, 8)), dict(TINY_HEAD, crop_size=64))
    assert model.window == 4 and model.decoder_scales == [2, 1]
    with torch.no_grad():
        assert model(pixels(64, b=2), ["a", "b"]).shape == (2, 2, 16, 16)
        assert model(pixels(48), ["a"]).shape == (1, 1, 12, 12)  # 6x6 grid: windows padded to 8x8


# ------------------------------------------------------------------------------ inference chunks
# A head with a 1x1 decoder stage wide enough that PyTorch's own CPU kernel (batches under 16 on
# one thread) rounds differently from oneDNN's: chunks of fewer than 16 maps would change logits.
CHUNK_HEAD = dict(TINY_HEAD, crop_size=64, decoder_dims=[128, 96], decoder_guidance_proj_dims=[4, 16])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("max_classes", [256, 16])  # 16 of 20 classes: the top-k path
def test_chunks_of_class_maps_give_the_same_logits_to_the_bit(tiny_config, monkeypatch, threads, max_classes):
    """Without gradients the spatial aggregation and the decoder run over chunks of (image, class)
    maps sized by CPU_CHUNK_BYTES; chunk edges fall inside an image's classes, whose guidance each
    map must still find."""
    from silc_bench.catseg import model as catseg_model

    torch.set_num_threads(threads)
    model = CatSeg(big_vision_backbone(tiny_config, patch_size=8, grid=(8, 8)),
                   dict(CHUNK_HEAD, max_classes=max_classes)).eval()
    assert model.decoder_scales == [2, 1]  # the second decoder stage is a 1x1 transposed conv
    d = model.backbone.dense_features(pixels(64)).shape[-1]
    text = F.normalize(torch.randn(20, 1, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    px = pixels(64, b=3)
    maps = 3 * min(20, max_classes)
    agg = model.head.aggregator
    with torch.no_grad(), catseg_model.whole_stack():
        whole = model(px, text)
    # Largest activation per map, fp32: decoder 16x16 positions x 128 channels; spatial 8x8 positions
    # x max(MLP hidden 64, 2 heads x 16 window tokens).
    decoder_bytes, spatial_bytes = agg.decoder_row_bytes(8, 8, 4), agg.spatial[0].row_bytes(8, 8, 4)
    assert (decoder_bytes, spatial_bytes) == (16 * 16 * 128 * 4, 8 * 8 * 64 * 4)

    def expected(per_chunk, least=catseg_model.LEAST_MAPS):
        per_chunk = min(maps, max(least, per_chunk))
        chunks = [per_chunk] * (maps // per_chunk) + ([maps % per_chunk] if maps % per_chunk else [])
        if len(chunks) > 1 and chunks[-1] < least:
            chunks[-2:] = [chunks[-2] + chunks[-1]]
        return chunks

    for budget in (5 * spatial_bytes, 16 * spatial_bytes, 25 * spatial_bytes, 18 * decoder_bytes, 2**40):
        monkeypatch.setattr(catseg_model, "CPU_CHUNK_BYTES", budget)
        calls = {"decoder": [], "spatial": []}
        hooks = [agg.out.register_forward_hook(lambda m, a, o: calls["decoder"].append(o.shape[0])),
                 agg.spatial[0].block1.register_forward_hook(lambda m, a, o: calls["spatial"].append(o.shape[0]))]
        with torch.no_grad():
            got = model(px, text)
        for h in hooks:
            h.remove()
        assert calls["decoder"] == expected(budget // decoder_bytes, catseg_model.LEAST_MAPS_1X1_CONV)
        assert calls["spatial"] == expected(budget // spatial_bytes)
        assert torch.equal(got, whole), f"budget {budget}: max difference {(got - whole).abs().max()}"
    assert len(expected(5)) > 1 and len(expected(16)) > 1  # the first budgets chunk both parts
    monkeypatch.undo()
    with torch.enable_grad():  # training: one chunk (gradients summed as before), the same logits
        assert torch.equal(model(px, text).detach(), whole)


def test_chunk_sizes_fit_the_budget_and_training_keeps_one():
    from silc_bench.catseg import model as catseg_model
    from silc_bench.catseg.model import ACCELERATOR_CHUNK_BYTES, CPU_CHUNK_BYTES, maps_per_chunk, row_chunks

    with torch.no_grad():
        assert maps_per_chunk(750, 2**19, "cpu") == CPU_CHUNK_BYTES // 2**19
        assert maps_per_chunk(750, 2**30, "cpu") == 2  # never one map alone (see CPU_CHUNK_BYTES)
        assert maps_per_chunk(750, 2**30, "cpu", least=16) == 16
        assert maps_per_chunk(10, 2**30, "cpu", least=16) == 10
        assert maps_per_chunk(2400, 2**20, "cuda:0") == ACCELERATOR_CHUNK_BYTES // 2**20
    assert maps_per_chunk(750, 2**19, "cpu") == 750  # gradients on
    with torch.no_grad(), catseg_model.whole_stack():  # CAT-Seg's own forward, for benchmarks
        assert maps_per_chunk(750, 2**30, "cpu") == 750
        assert maps_per_chunk(2400, 2**30, "cuda:0") == 2400
    assert catseg_model.CPU_CHUNK_BYTES == CPU_CHUNK_BYTES  # restored
    assert [(r.start, r.stop) for r, _ in row_chunks(11, 3, 5, "cpu")] == [(0, 5), (5, 11)]
    assert [(r.start, r.stop) for r, _ in row_chunks(40, 3, 16, "cpu", least=16)] == [(0, 16), (16, 40)]
    assert [(r.start, r.stop) for r, _ in row_chunks(48, 3, 16, "cpu", least=16)] == [(0, 16), (16, 32), (32, 48)]
    assert [i.tolist() for _, i in row_chunks(7, 3, 4, "cpu")] == [[0, 0, 0, 1], [1, 1, 2]]


# ------------------------------------------------------------------------------ trainable set
QV_PATTERNS = {
    "big_vision": r"model\.(img|txt)\.blocks\.\d+\.attn\.(query|value)\.(weight|bias)",
    "open_clip": r"model\.(visual\.)?transformer\.resblocks\.\d+\.attn\.parametrizations\.in_proj_(weight|bias)\.original[02]",
    "hf": r"model\.(vision|text)_model\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj\.(weight|bias)",
}


@pytest.mark.parametrize("kind", ["big_vision", "open_clip", "hf_clip", "hf_siglip"])
def test_trainable_is_qv_of_both_towers_plus_head(kind, tiny_config):
    backbone = {"big_vision": lambda: big_vision_backbone(tiny_config), "open_clip": open_clip_backbone,
                "hf_clip": lambda: hf_backbone("clip"), "hf_siglip": lambda: hf_backbone("siglip")}[kind]()
    px = pixels(32)
    with torch.no_grad():
        before = (backbone.dense_features(px), backbone.encode_text(backbone.tokenize(["a cat"])))
    model = CatSeg(backbone, TINY_HEAD)
    with torch.no_grad():  # splitting fused q/k/v (open_clip) changes no output
        after = (backbone.dense_features(px), backbone.encode_text(backbone.tokenize(["a cat"])))
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    pattern = re.compile(QV_PATTERNS["hf" if kind.startswith("hf") else kind] + "$")
    qv = {"backbone." + n for n, _ in backbone.named_parameters() if pattern.match(n)}
    head = {"head." + n for n, _ in model.head.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == qv | head
    depth_img, depth_txt = 3 if kind != "big_vision" else 2, 2
    assert len(qv) == 4 * (depth_img + depth_txt)  # q, v x (weight, bias) per block
    assert sorted(model.backbone_trainable) == sorted(qv)
    if kind == "open_clip":  # the k third of every fused tensor stays frozen
        ks = [p for n, p in backbone.named_parameters() if n.endswith("original1")]
        assert len(ks) == 2 * (depth_img + depth_txt) and not any(p.requires_grad for p in ks)
    # gradients reach q/v of both towers through the model's own forward (text: the class prompts)
    model(px, ["a cat", "a dog"]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n in qv}
    is_text = lambda n: re.search(r"\.txt\.|text_model|^backbone\.model\.transformer", n)  # noqa: E731
    for tower in (True, False):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if bool(is_text(n)) == tower)


def test_early_version_trains_image_attention_and_position_embedding(tiny_config):
    backbone = big_vision_backbone(tiny_config)
    model = CatSeg(backbone, {**TINY_HEAD, "version": "early", "templates": ["a photo of a {}.", "a {}."]})
    pattern = re.compile(r"model\.img\.(pos_embedding|blocks\.\d+\.attn\.(query|key|value|out)\.(weight|bias))$")
    expected = {"backbone." + n for n, _ in backbone.named_parameters() if pattern.match(n)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert trainable == expected
    d = model.describe()
    assert d["config"]["text_encoder"] == "frozen" and d["config"]["cost_templates"] == "channels"
    assert model.head.aggregator.cost_embed.in_channels == 2  # one cost channel per template
    assert CatSegConfig.from_dict({"version": "early"}).template_list()[0] == "a bad photo of a {}."


# ------------------------------------------------------------------------------ ViT-B/16 head size
def test_head_parameter_count_vit_b16():
    """CAT-Seg (CVPR) head for CLIP ViT-B/16 (embed 512, width 768), counted layer by layer."""
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    catseg = CatSeg(OpenClipModel.from_module(model, "ViT-B-16"))
    d_emb, width, hid, g_app, g_txt = 512, 768, 128, 128, 128
    linear = lambda i, o: i * o + o  # noqa: E731
    conv = lambda i, o, k, bias=True: i * o * k * k + (o if bias else 0)  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    cost_embed = conv(1, hid, 7)  # 1 channel: the single template
    swin = (norm(hid) + 2 * linear(hid + g_app, hid) + linear(hid, hid) + linear(hid, hid)  # q, k, v, proj
            + norm(hid) + linear(hid, 4 * hid) + linear(4 * hid, hid))  # MLP
    spatial = 2 * swin + norm(g_app)  # two blocks + the guidance LayerNorm
    classwise = (2 * linear(hid + g_txt, hid) + linear(hid, hid) + 2 * norm(hid)
                 + linear(hid, 4 * hid) + linear(4 * hid, hid) + hid + g_txt)  # + padding token / guidance
    appearance = conv(d_emb, g_app, 3)
    text = linear(d_emb, g_txt)
    decoder_guidance = conv(256, 32, 3) + conv(128, 16, 3)
    up1 = (128 * 96 * 2 * 2 + 96) + conv(128, 64, 3, False) + norm(64) + conv(64, 64, 3, False) + norm(64)
    up2 = (64 * 48 * 2 * 2 + 48) + conv(64, 32, 3, False) + norm(32) + conv(32, 32, 3, False) + norm(32)
    out = conv(32, 1, 3)
    vit_upsample = (width * 256 * 2 * 2 + 256) + (width * 128 * 4 * 4 + 128)  # blocks 3 and 7
    expected = (cost_embed + 2 * (spatial + classwise) + appearance + text + decoder_guidance + up1 + up2 + out
                + vit_upsample)
    got = catseg.head_parameter_count()
    print(f"CAT-Seg head parameters for CLIP ViT-B/16: {got:,} (hand count {expected:,})")
    assert got == expected == 4_668_641
    assert catseg.guidance_blocks == [3, 7] and catseg.window == 12


# ------------------------------------------------------------------------------ top-256 rule
def test_more_than_256_classes_keeps_top_256(tiny_config):
    backbone = big_vision_backbone(tiny_config)  # patch 8, 32 px -> 4x4 grid
    model = CatSeg(backbone, TINY_HEAD).eval()
    seen = []
    model.head.aggregator.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    d = backbone.dense_features(pixels(32, b=2)).shape[-1]
    text = F.normalize(torch.randn(300, 1, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    px = pixels(32, b=2)
    with torch.no_grad():
        out = model(px, text)
        raw = torch.einsum("bhwd,kd->bkhw", F.normalize(backbone.dense_features(px), dim=-1), text[:, 0])
    assert seen[-1][2] == 256 and out.shape == (2, 300, 8, 8)
    for b in range(2):
        floored = (out[b] == -100.0).flatten(1).all(dim=1)
        assert int(floored.sum()) == 44
        lowest = raw[b].flatten(1).amax(dim=1).argsort()[:44]
        assert set(lowest.tolist()) == set(torch.nonzero(floored).flatten().tolist())
    with torch.no_grad():
        model(px, text[:200])
    assert seen[-1][2] == 200  # fewer classes: all aggregated (padded to 256 inside class attention)


# ------------------------------------------------------------------------------ interface methods
def _hook_blocks(blocks, run, batch_first=True):
    got = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    run()
    for h in hooks:
        h.remove()
    return {i: (v if batch_first else v.transpose(0, 1)) for i, v in got.items()}


@pytest.mark.parametrize("kind", ["big_vision", "open_clip", "hf_clip", "hf_siglip"])
def test_dense_with_intermediates_matches_references(kind, tiny_config):
    px = pixels(48, b=2)  # 6x6 grid: position tables interpolated
    if kind == "big_vision":
        bb = big_vision_backbone(tiny_config, depth=3)
        blocks, prefix = bb.model.img.blocks, 0
        ref = _hook_blocks(blocks, lambda: bb.model.img.encode(px))
        modes = bb.dense_modes
    elif kind == "open_clip":
        bb = open_clip_backbone()
        blocks, prefix = bb.model.visual.transformer.resblocks, 1
        ref = _hook_blocks(blocks, lambda: bb.dense_features(px, "tokens"))
        modes = bb.dense_modes
    else:
        bb = hf_backbone(kind[3:])
        vm = bb.model.vision_model
        hidden = vm(pixel_values=px, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        ref, prefix, modes = dict(enumerate(hidden[1:])), (1 if kind == "hf_clip" else 0), bb.dense_modes
    for mode in modes:
        with torch.no_grad():
            dense, inter = bb.dense_features_with_intermediates(px, mode, blocks=None)
            torch.testing.assert_close(dense, bb.dense_features(px, mode), rtol=1e-4, atol=1e-5)
        assert sorted(inter) == sorted(ref)
        for i, tokens in inter.items():
            torch.testing.assert_close(tokens, ref[i][:, prefix:].reshape(2, 6, 6, -1), rtol=1e-4, atol=1e-5)
    _, inter = bb.dense_features_with_intermediates(px, None, blocks=(-1, 0))
    assert sorted(inter) == [0, len(ref) - 1]
    with pytest.raises(ValueError, match="out of range"):
        bb.dense_features_with_intermediates(px, None, blocks=(len(ref),))


# ------------------------------------------------------------------------------ attention pieces
def _naive_swin(block: SwinBlock, x, guidance, window, shift):
    """Full attention over the map; token i sees token j iff both fall in the same window of a grid
    whose windows start at -shift (no wrap-around): Swin's cyclic shift + mask, stated directly."""
    n, h, w, c = x.shape
    y = block.norm1(x)
    qk_in = torch.cat([y, guidance], -1) if guidance is not None else y
    a = block.attn
    q, k, v = a.q(qk_in), a.k(qk_in), a.v(y)
    r, s = torch.arange(h), torch.arange(w)
    gr, gc = (r + (window - shift) % window) // window, (s + (window - shift) % window) // window
    group = (gr[:, None] * 1000 + gc[None, :]).flatten()
    allowed = group[:, None] == group[None, :]
    hd = c // a.heads
    q, k, v = (t.reshape(n, h * w, a.heads, hd).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = a.proj((att @ v).transpose(1, 2).reshape(n, h, w, c))
    x = x + o
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("size,shift", [(8, 0), (8, 2), (6, 0), (6, 2), (10, 2)])
def test_swin_block_matches_naive_windows(size, shift):
    torch.manual_seed(0)
    block = SwinBlock(16, 8, heads=2, window=4, shift=shift, mlp_ratio=2.0)
    x, g = torch.randn(3, size, size, 16), torch.randn(3, size, size, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x, g), _naive_swin(block, x, g, 4, shift), rtol=1e-4, atol=1e-5)


def test_linear_attention_matches_naive():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 7, 2, 5), torch.randn(3, 9, 2, 5), torch.randn(3, 9, 2, 4)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    sim = torch.einsum("nlhd,nshd->nhls", phi_q, phi_k)
    ref = torch.einsum("nhls,nshe->nlhe", sim / sim.sum(-1, keepdim=True), v)
    torch.testing.assert_close(linear_attention(q, k, v), ref, rtol=1e-4, atol=1e-5)
