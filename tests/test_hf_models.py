"""transformers SigLIP / CLIP directories behind the interface, checked against transformers itself.

Tiny random models saved with save_pretrained, with tokenizers built offline: a CLIP BPE from a
vocabulary written here, a SigLIP sentencepiece model trained here.
"""
import copy
import importlib.util
import io
import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel

from silc_bench.checkpoints.hf import HFModel, load_hf
from silc_bench.errors import UserError
from silc_bench.hashing import sha256_dir

TOL = dict(rtol=1e-4, atol=1e-5)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8)
TEXTS = ["a photo of a cat", "the quick brown fox jumps over the lazy dog"]
HAS_PROTOBUF = importlib.util.find_spec("google.protobuf") is not None


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _pixels(h, w=None, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w or h, generator=g)


def _siglip_tokenizer(directory):
    """A SigLIP tokenizer from a sentencepiece model trained on a few sentences."""
    import sentencepiece as spm
    corpus = ["a photo of a cat", "a photo of a dog", "the quick brown fox jumps over the lazy dog",
              "a picture of the sky"] * 30
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=48,
                                   model_type="unigram", unk_id=2, pad_id=0, eos_id=1, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    spm_path = directory / "trained.spm"
    spm_path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    if HAS_PROTOBUF:
        from transformers import SiglipTokenizer
        tok = SiglipTokenizer(vocab_file=str(spm_path))
    else:  # SiglipTokenizer needs protobuf: build the same unigram model with `tokenizers` instead
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        core = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id()))
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Metaspace()
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", sp.eos_id())])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    spm_path.unlink()
    return tok, sp.get_piece_size()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("siglip")
    tok, vocab_size = _siglip_tokenizer(d)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2),
                       vision_config=VISION)
    model = _perturb(SiglipModel(cfg))
    model.save_pretrained(d)
    return d


def write_clip_tokenizer(directory) -> dict:
    """A CLIP BPE tokenizer (letters, a few merges, CLIP's special tokens) saved into `directory`;
    -> its vocabulary."""
    vocab = {}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    merges = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    vocab = write_clip_tokenizer(d)
    torch.manual_seed(0)
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      bos_token_id=sot, eos_token_id=eot, pad_token_id=eot),
                     vision_config=VISION, projection_dim=24)
    model = _perturb(CLIPModel(cfg))
    model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1],
        "size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "resample": 3}))
    return d


def _reference(cls, directory):
    return cls.from_pretrained(str(directory), use_safetensors=True).eval()


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_siglip_embeddings_match_transformers(siglip_dir):
    m = load_hf(siglip_dir)
    ref = _reference(SiglipModel, siglip_dir)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(siglip_dir))
    ids = m.tokenize(TEXTS)
    assert ids.shape == (2, 64) and ids.dtype == torch.int64
    torch.testing.assert_close(ids, tok(TEXTS, padding="max_length", max_length=64, return_tensors="pt")["input_ids"])
    px = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(px), _pooled(ref.get_image_features(pixel_values=px)), **TOL)
        torch.testing.assert_close(m.encode_text(ids), _pooled(ref.get_text_features(input_ids=ids)), **TOL)
    assert m.logit_scale == pytest.approx(float(ref.logit_scale.detach().exp()))
    assert m.logit_bias == pytest.approx(float(ref.logit_bias.detach()))
    d = m.describe()
    assert d["format"] == "hf" and d["model_type"] == "siglip" and d["sha256"] == sha256_dir(siglip_dir)
    assert d["path"] == str(siglip_dir)
    assert d["tokenizer"]["kind"] == "hf" and d["tokenizer"]["context_length"] == 64
    assert len(d["tokenizer"]["sha256"]) == 64 and "tokenizer_config.json" in d["tokenizer"]["files"]
    assert d["preprocess"]["resize"] == "squash" and d["preprocess"]["mean"] == (0.5, 0.5, 0.5)
    assert d["preprocess"]["image_size"] == (32, 32) and d["patch_size"] == 8


def _map_loop(ref, tokens, with_mlp=True):
    """The pooling head itself, run with one token at a time as its only key/value."""
    head = copy.deepcopy(ref.vision_model.head)
    outs = []
    for i in range(tokens.shape[1]):
        if with_mlp:
            outs.append(head(tokens[:, i:i + 1]))
        else:
            probe = head.probe.expand(tokens.shape[0], -1, -1)
            outs.append(head.attention(probe, tokens[:, i:i + 1], tokens[:, i:i + 1])[0][:, 0])
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (40, 24)])
def test_siglip_map_value_dense(siglip_dir, size):
    m = load_hf(siglip_dir)
    ref = _reference(SiglipModel, siglip_dir)
    px = _pixels(*size)
    gh, gw = size[0] // 8, size[1] // 8
    with torch.no_grad():
        tokens = ref.vision_model(pixel_values=px, interpolate_pos_encoding=size != (32, 32)).last_hidden_state
        for mode, expected in [("map_value", _map_loop(ref, tokens)),
                               ("map_value_no_mlp", _map_loop(ref, tokens, with_mlp=False)),
                               ("tokens", tokens)]:
            got = m.dense_features(px, mode)
            assert got.shape == (2, gh, gw, 32)
            torch.testing.assert_close(got, expected.reshape(2, gh, gw, 32), **TOL)
        assert m.default_dense_mode == "map_value"
        torch.testing.assert_close(m.dense_features(px), m.dense_features(px, "map_value"))


def test_siglip_interpolation_is_bicubic(siglip_dir):
    """At another size, the tower must equal one whose table was resized by plain bicubic here."""
    m = load_hf(siglip_dir)
    ref = _reference(SiglipModel, siglip_dir)
    emb = ref.vision_model.embeddings
    table = emb.position_embedding.weight.data.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, size=(6, 6), mode="bicubic", align_corners=False)
    emb.position_embedding = torch.nn.Embedding.from_pretrained(table.permute(0, 2, 3, 1).reshape(36, -1))
    emb.position_ids = torch.arange(36)[None]
    px = _pixels(48)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(px), _pooled(ref.get_image_features(pixel_values=px)), **TOL)
    assert "bicubic" in m.describe()["pos_embed_interpolation"]


def test_clip_embeddings_and_maskclip(clip_dir):
    m = load_hf(clip_dir)
    ref = _reference(CLIPModel, clip_dir)
    ids = m.tokenize(TEXTS)
    assert ids.shape == (2, 77)
    px = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(px), _pooled(ref.get_image_features(pixel_values=px)), **TOL)
        torch.testing.assert_close(m.encode_text(ids), _pooled(ref.get_text_features(input_ids=ids)), **TOL)
        for size in [(32, 32), (48, 40)]:
            px = _pixels(*size)
            gh, gw = size[0] // 8, size[1] // 8
            vm = ref.vision_model
            out = vm(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=size != (32, 32))
            assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
            n = out.last_hidden_state.shape[1]
            self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)[None, None].expand(2, 1, n, n)
            x = vm.encoder.layers[-1](out.hidden_states[-2], self_only)  # each token attends to itself
            expected = ref.visual_projection(vm.post_layernorm(x[:, 1:])).reshape(2, gh, gw, 24)
            torch.testing.assert_close(m.dense_features(px), expected, **TOL)
            tokens = ref.visual_projection(vm.post_layernorm(out.last_hidden_state[:, 1:])).reshape(2, gh, gw, 24)
            torch.testing.assert_close(m.dense_features(px, "tokens"), tokens, **TOL)
    d = m.describe()
    assert d["model_type"] == "clip" and d["logit_bias"] is None
    assert d["preprocess"] == {"image_size": (32, 32), "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1),
                               "resize": "shortest", "interpolation": "bicubic"}
    assert m.dense_modes == ("maskclip", "tokens")
    with pytest.raises(ValueError):
        m.dense_features(px, "map_value")


@pytest.mark.skipif(not HAS_PROTOBUF, reason="SiglipTokenizer needs protobuf")
def test_siglip_dir_uses_siglip_tokenizer(siglip_dir):
    assert load_hf(siglip_dir).describe()["tokenizer"]["class"] == "SiglipTokenizer"


def test_bad_directories(tmp_path, clip_dir):
    with pytest.raises(UserError, match="nowhere"):
        load_hf(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_hf(empty)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="bert"):
        load_hf(bert)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        load_hf(broken)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf(no_weights)
    (no_weights / "model.safetensors").write_bytes((clip_dir / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="tokenizer"):
        load_hf(no_weights)
    (no_weights / "model.safetensors").unlink()
    (no_weights / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_hf(no_weights)


def test_missing_or_misshaped_weights(tmp_path, clip_dir):
    from safetensors.torch import load_file, save_file
    for name, edit in [("missing", lambda sd: sd.pop("visual_projection.weight")),
                       ("misshaped", lambda sd: sd.__setitem__("vision_model.post_layernorm.weight", torch.zeros(5)))]:
        d = tmp_path / name
        d.mkdir()
        for f in clip_dir.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        sd = load_file(str(d / "model.safetensors"))
        edit(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(UserError, match="visual_projection|post_layernorm"):
            load_hf(d)


def test_hfmodel_rejects_unknown_family(clip_dir):
    m = load_hf(clip_dir)
    with pytest.raises(ValueError):
        HFModel(m.model, "bert", m.tokenizer, m.preprocess)


@pytest.mark.parametrize("which", ["siglip", "clip"])
def test_windows_that_are_not_a_patch_multiple_floor_the_grid(which, siglip_dir, clip_dir):
    """As open_clip and the anchors: the last partial patch row / column is dropped (issue: very wide images)."""
    model = load_hf(siglip_dir if which == "siglip" else clip_dir)
    p = model.patch_size
    pixels = torch.randn(1, 3, 3 * p + 3, 5 * p + 1)
    out = model.dense_features(pixels)
    assert tuple(out.shape[1:3]) == (3, 5)
    assert torch.allclose(out, model.dense_features(pixels[..., :3 * p, :5 * p]), atol=1e-6)
