"""Shared pytest fixtures: a tiny trained sentencepiece model and a tiny big_vision checkpoint.

Everything is generated locally (no downloads) and kept tiny so tests stay fast on 2 CPU cores.
"""
from __future__ import annotations

import random

import pytest
import torch

_WORDS = {
    "det": ["a", "the", "one", "my", "this", "that", "some"],
    "adj": ["small", "large", "red", "blue", "green", "old", "new", "bright", "dark", "wooden", "happy", "striped"],
    "noun": ["cat", "dog", "car", "tree", "house", "bird", "boat", "person", "chair", "table", "road", "sky",
             "mountain", "flower", "horse", "bicycle", "bottle", "window", "building", "grass"],
    "verb": ["sits on", "stands near", "looks at", "runs past", "lies under", "is next to", "flies over"],
    "lead": ["a photo of", "a picture of", "an image of", "a close-up of", "a rendering of", "a painting of"],
}


def generated_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic simple English captions (lower case) to train a toy tokenizer on."""
    rng = random.Random(seed)
    w = _WORDS
    out = []
    for _ in range(n):
        s = f"{rng.choice(w['lead'])} {rng.choice(w['det'])} {rng.choice(w['adj'])} {rng.choice(w['noun'])}"
        if rng.random() < 0.6:
            s += f" that {rng.choice(w['verb'])} {rng.choice(w['det'])} {rng.choice(w['noun'])}"
        out.append(s + ("." if rng.random() < 0.5 else ""))
    return out


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """A tiny unigram sentencepiece model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(generated_sentences()),
        model_prefix=str(d / "tiny"),
        vocab_size=96,
        model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return d / "tiny.model"


def tiny_two_tower_config(**img_kw):
    """A SigLIP-shaped two-tower small enough for CPU tests (32 px images, width 32, depth 2)."""
    from silc_bench.models.text import TextConfig
    from silc_bench.models.two_tower import TwoTowerConfig
    from silc_bench.models.vit import ViTConfig

    img = dict(width=32, depth=2, heads=2, mlp_dim=64, patch_size=8, grid=(4, 4), pool_type="map", out_dim=None)
    img.update(img_kw)
    txt = TextConfig(vocab_size=128, width=32, depth=2, heads=2, mlp_dim=64, length=16, out_dim=img.get("out_dim") or 32)
    return TwoTowerConfig(img=ViTConfig(**img), txt=txt, bias=True)


@pytest.fixture(scope="session")
def tiny_big_vision_npz(tmp_path_factory, sp_model_path):
    """Path of a random tiny SigLIP-style big_vision .npz with a tokenizer sidecar (`<path>.json`)."""
    from silc_bench.checkpoints.big_vision import save_big_vision
    from silc_bench.models.two_tower import TwoTower

    model = TwoTower.from_config(tiny_two_tower_config(), seed=0)
    path = tmp_path_factory.mktemp("bv") / "tiny_siglip.npz"
    spec = {"kind": "sentencepiece", "file": str(sp_model_path), "context_length": 16, "pad_id": 1,
            "lowercase": True, "eos": "sticky"}
    save_big_vision(model, path, tokenizer=spec)
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny_two_tower_config(**img_overrides)` factory, as a fixture."""
    return tiny_two_tower_config


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    float sums then run in one order, as in the subprocesses those modules start, and tiny tensors
    on 2 shared cores do not contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
