"""LiT-Decoder: a small autoregressive text decoder on a frozen image encoder (SILC Table 5).

No LiT-Decoder code is public (docs/PROTOCOLS_T1_T4_T5.md B). The block follows big_vision's CapPa
decoder, read for facts: pre-LN, causal self-attention, cross-attention to every image token, then a
GELU MLP. Every size is set in the config. The image tokens are the backbone's full final-norm
sequence (`detection_tokens`: the patch tokens, then its global token when it has one), linearly
projected to the decoder's width. The backbone is frozen and never run in training mode.

Sequences: [BOS] prefix answer [EOS]. The prefix picks the task ("classify", "caption", "answer"
plus the question); the loss covers the answer and EOS only. Prompts of different lengths are
left-padded, with a key mask, and positions count from each prompt's first real token, so a
batch decodes as its items would alone. Greedy decoding keeps a KV cache.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    width: int = 768
    depth: int = 6
    heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 64           # prompt + answer tokens
    vocab_size: int = 32_000    # set from the tokenizer

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def _split(self, x):  # [B, L, D] -> [B, H, L, D/H]
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, kv_source=None, mask=None, cache: dict | None = None, static: bool = False):
        """`cache` (a dict per layer): self-attention appends this step's keys and values;
        cross-attention (`static`) computes them once from `kv_source` and reuses them."""
        q = self._split(self.q(x))
        if static and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv_source is None else kv_source
            k, v = self._split(self.k(src)), self._split(self.v(src))
            if cache is not None:
                if not static and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads)
        self.cross_attn = _Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width))

    def forward(self, x, memory, self_mask, cache=None):
        x = x + self.self_attn(self.ln1(x), mask=self_mask, cache=None if cache is None else cache["self"])
        x = x + self.cross_attn(self.ln2(x), memory, cache=None if cache is None else cache["cross"], static=True)
        return x + self.mlp(self.ln3(x))


class LitDecoder(nn.Module):
    """Decoder + the projection of the frozen backbone's tokens; the backbone is held, not trained."""

    def __init__(self, backbone, config: DecoderConfig, image_width: int):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.config = c = config
        self.image_proj = nn.Linear(image_width, c.width)
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Parameter(torch.zeros(1, c.max_len, c.width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(DecoderBlock(c.width, c.heads, c.mlp_dim) for _ in range(c.depth))
        self.ln_out = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no batch statistics
        return self

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the backbone's full token sequence [B, L, W] (cache these to train faster)."""
        patches, glob, _ = self.backbone.detection_tokens(pixels)
        tokens = patches.flatten(1, 2)
        return tokens if glob is None else torch.cat([tokens, glob[:, None].to(tokens.dtype)], dim=1)

    def _positions(self, key_mask: torch.Tensor) -> torch.Tensor:
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)

    def logits(self, image_tokens: torch.Tensor, ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ids [B, T] (left-padded, `key_mask` False on padding) -> logits [B, T, V]."""
        memory = self.image_proj(image_tokens.to(self.image_proj.weight.dtype))
        t = ids.shape[1]
        x = self.embed(ids) + self.pos[0, self._positions(key_mask)]
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        mask = (causal[None] & key_mask[:, None, :])[:, None]  # [B, 1, T, T]
        mask = mask | torch.eye(t, dtype=torch.bool, device=ids.device)  # a padding row attends to itself
        for block in self.blocks:
            x = block(x, memory, mask)
        return self.head(self.ln_out(x))

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, prompts: list[list[int]], *, bos: int, eos: int, pad: int,
                 max_new_tokens: int, use_cache: bool = True) -> list[list[int]]:
        """Greedy decoding of a batch: prompts (token ids, without BOS) left-padded -> generated ids
        (up to EOS, which is dropped). `use_cache=False` recomputes every step (for tests and timing)."""
        b = len(prompts)
        seqs = [[bos] + list(p) for p in prompts]
        width = max(len(s) for s in seqs)
        dev = image_tokens.device
        ids = torch.full((b, width), pad, dtype=torch.long, device=dev)
        key_mask = torch.zeros(b, width, dtype=torch.bool, device=dev)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, device=dev)
            key_mask[i, width - len(s):] = True
        memory = self.image_proj(image_tokens.to(self.image_proj.weight.dtype))
        out = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        budget = min(max_new_tokens, self.config.max_len - width)
        if use_cache:
            caches = [{"self": {}, "cross": {}} for _ in self.blocks]
            step_ids, offset = ids, 0
        for step in range(budget):
            if use_cache:
                t = step_ids.shape[1]
                full = key_mask
                pos = self._positions(full)[:, offset:offset + t]
                x = self.embed(step_ids) + self.pos[0, pos]
                causal = torch.ones(t, offset + t, dtype=torch.bool, device=dev).tril(diagonal=offset)
                mask = (causal[None] & full[:, None, :])[:, None]
                mask = mask | (torch.arange(offset + t, device=dev)[None, :] == (offset + torch.arange(t, device=dev))[:, None])
                for block, cache in zip(self.blocks, caches):
                    x = block(x, memory, mask, cache)
                next_logits = self.head(self.ln_out(x[:, -1]))
                offset += t
            else:
                next_logits = self.logits(image_tokens, ids, key_mask)[:, -1]
            nxt = next_logits.argmax(-1)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) == eos:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            key_mask = torch.cat([key_mask, torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
            if use_cache:
                step_ids = nxt[:, None]
        return out


@torch.no_grad()
def beam_search(decoder: LitDecoder, image_tokens: torch.Tensor, prompts: list[list[int]], *, bos: int, eos: int,
                max_new_tokens: int, beams: int = 4, length_penalty: float = 0.0) -> list[list[int]]:
    """Beam search, one example at a time (its beams are one batch): at each step every live beam
    is extended by its `beams` best tokens and the best `beams` candidates are kept; a candidate
    ending in EOS is finished. Stops when `beams` are finished or the length is spent. The answer
    is the best finished beam (else the best live one) by log-probability / length^length_penalty
    (0: plain log-probability). `beams=1` is greedy decoding."""
    out = []
    for i, prompt in enumerate(prompts):
        head = [bos] + list(prompt)
        budget = min(max_new_tokens, decoder.config.max_len - len(head))
        live, done = [([], 0.0)], []
        for _ in range(budget):
            ids = torch.tensor([head + s for s, _ in live], device=image_tokens.device)
            mem = image_tokens[i:i + 1].expand(len(live), -1, -1)
            logp = decoder.logits(mem, ids, torch.ones_like(ids, dtype=torch.bool))[:, -1].float().log_softmax(-1)
            top = logp.topk(min(beams, logp.shape[-1]), dim=-1)
            cand = [(live[j][0] + [int(t)], live[j][1] + float(v))
                    for j in range(len(live)) for v, t in zip(top.values[j], top.indices[j])]
            cand.sort(key=lambda c: -c[1])
            live = []
            for seq, score in cand:
                if seq[-1] == eos:
                    done.append((seq[:-1], score))
                elif len(live) < beams:
                    live.append((seq, score))
                if len(live) == beams and len(done) >= beams:
                    break
            if len(done) >= beams or not live:
                break
        pool = done or live
        best = max(pool, key=lambda c: c[1] / (max(len(c[0]), 1) ** length_penalty))
        out.append(best[0])
    return out
