"""LiT-Decoder: greedy decoding with the KV cache equals decoding without it (batched, prompts of
different lengths); a batch decodes as its items alone; a toy decoder overfits a tiny set to exact
match 100."""
import pytest
import torch

from silc_bench.litdec.model import DecoderConfig, LitDecoder
from silc_bench.models.two_tower import BigVisionModel, TwoTower

pytestmark = pytest.mark.usefixtures("one_thread")
BOS, EOS, PAD = 0, 1, 0


@pytest.fixture(scope="module")
def backbone(tiny_config, sp_model_path):
    from silc_bench.tokenizers import SentencePieceTokenizer

    return BigVisionModel(TwoTower.from_config(tiny_config(), seed=0),
                          SentencePieceTokenizer(str(sp_model_path), context_length=16)).eval()


def _decoder(backbone, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = DecoderConfig(**{**dict(width=32, depth=2, heads=2, mlp_dim=64, max_len=24, vocab_size=40), **kw})
    return LitDecoder(backbone, cfg, image_width=32).eval()


def test_kv_cache_equals_recomputing(backbone):
    dec = _decoder(backbone)
    with torch.no_grad():  # random weights: give EOS a low logit so sequences run long
        dec.head.bias[EOS] = -5.0
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = dec.image_tokens(pixels)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    cached = dec.generate(tokens, prompts, bos=BOS, eos=EOS, pad=PAD, max_new_tokens=12, use_cache=True)
    plain = dec.generate(tokens, prompts, bos=BOS, eos=EOS, pad=PAD, max_new_tokens=12, use_cache=False)
    assert cached == plain and max(len(c) for c in cached) >= 8
    alone = [dec.generate(tokens[i:i + 1], [p], bos=BOS, eos=EOS, pad=PAD, max_new_tokens=12)[0]
             for i, p in enumerate(prompts)]
    assert alone == cached  # left padding, masks and positions: a batch decodes as its items alone


def test_frozen_backbone_is_not_trained(backbone):
    dec = _decoder(backbone)
    dec.train()
    assert not dec.backbone.training
    assert all(not p.requires_grad for p in dec.backbone.parameters())
    assert all(p.requires_grad for n, p in dec.named_parameters() if not n.startswith("backbone."))


def test_overfits_a_tiny_set_to_exact_match(backbone):
    dec = _decoder(backbone, seed=1)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    prompts = [[5], [5], [6, 7], [6, 8]]
    answers = [[20, 21], [22], [23, 24, 25], [26]]
    tokens = dec.image_tokens(pixels)
    width = max(1 + len(p) + len(a) + 1 for p, a in zip(prompts, answers))
    ids = torch.full((4, width), PAD)
    key_mask = torch.zeros(4, width, dtype=torch.bool)
    target = torch.full((4, width), -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = [BOS] + p + a + [EOS]
        ids[i, width - len(seq):] = torch.tensor(seq)
        key_mask[i, width - len(seq):] = True
        for j in range(len(a) + 1):  # predict answer tokens and EOS from the position before each
            target[i, width - len(a) - 2 + j] = (a + [EOS])[j]
    opt = torch.optim.AdamW([p for p in dec.parameters() if p.requires_grad], lr=3e-3)
    dec.train()
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(dec.logits(tokens, ids, key_mask).flatten(0, 1), target.flatten(),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    out = dec.generate(tokens, prompts, bos=BOS, eos=EOS, pad=PAD, max_new_tokens=6)
    assert out == answers


def test_beam_search_of_one_is_greedy_and_a_full_beam_is_exhaustive(backbone):
    import itertools

    from silc_bench.litdec.model import beam_search

    vocab, length = 8, 2
    dec = _decoder(backbone, seed=2, vocab_size=vocab)
    with torch.no_grad():
        dec.head.bias[EOS] = 1.0
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = dec.image_tokens(pixels)
    prompts = [[5, 6], [7], [3, 4, 2]]
    greedy = dec.generate(tokens, prompts, bos=BOS, eos=EOS, pad=PAD, max_new_tokens=length)
    assert beam_search(dec, tokens, prompts, bos=BOS, eos=EOS, max_new_tokens=length, beams=1) == greedy

    @torch.no_grad()
    def logprob(i, seq, ended):
        full = [BOS] + prompts[i] + seq + ([EOS] if ended else [])
        ids = torch.tensor([full])
        lp = dec.logits(tokens[i:i + 1], ids, torch.ones_like(ids, dtype=torch.bool))[0].log_softmax(-1)
        return sum(float(lp[j - 1, full[j]]) for j in range(1 + len(prompts[i]), len(full)))

    words = [t for t in range(vocab) if t != EOS]
    for i in range(3):  # every answer: shorter than `length` and ended by EOS, or `length` long
        answers = [(list(s), True) for n in range(length) for s in itertools.product(words, repeat=n)]
        answers += [(list(s), False) for s in itertools.product(words, repeat=length)]
        best = max(answers, key=lambda a: logprob(i, *a))[0]
        got = beam_search(dec, tokens[i:i + 1], [prompts[i]], bos=BOS, eos=EOS, max_new_tokens=length,
                          beams=vocab ** length)[0]
        assert got == best
