"""LiT-Decoder greedy decoding: tokens/s with the KV cache against recomputing every step (one run).

A random-weight decoder (default: the B-sized config of configs/lit_decoder/b16.yaml, 6 layers of
width 768) on random image tokens (196 of width 768, a B/16 at 224 px), a batch of prompts of
different lengths, EOS suppressed so that every sequence runs the full length. Both paths must
generate the same tokens (checked).

    python benchmarks/litdec_decoding.py [--batch 8] [--new-tokens 32] [--width 768 --depth 6] [--device cpu]

Last line: `kv_cache_speedup=X` (tokens/s with the cache over tokens/s without).
"""
from __future__ import annotations

import argparse
import time

import torch

from silc_bench.litdec.model import DecoderConfig, LitDecoder


class _NoBackbone(torch.nn.Module):
    """The decoder holds a backbone; decoding from given image tokens never calls it."""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--image-tokens", type=int, default=196)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = DecoderConfig(width=args.width, depth=args.depth, heads=max(1, args.width // 64), mlp_dim=4 * args.width,
                        max_len=args.new_tokens + 16, vocab_size=32_000)
    dec = LitDecoder(_NoBackbone(), cfg, image_width=768).to(args.device).eval()
    with torch.no_grad():
        dec.head.bias[1] = -1e4  # EOS (id 1) never wins: full-length sequences
    tokens = torch.randn(args.batch, args.image_tokens, 768, device=args.device)
    prompts = [list(range(5, 5 + 2 + i % 6)) for i in range(args.batch)]
    kw = dict(bos=0, eos=1, pad=0, max_new_tokens=args.new_tokens)
    dec.generate(tokens[:1], prompts[:1], **{**kw, "max_new_tokens": 2})  # warm-up
    times, outs = {}, {}
    for cache in (True, False):
        t0 = time.perf_counter()
        outs[cache] = dec.generate(tokens, prompts, use_cache=cache, **kw)
        times[cache] = time.perf_counter() - t0
    n = sum(len(o) for o in outs[True])
    print(f"decoder width {args.width} depth {args.depth}, batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.image_tokens} image tokens, {args.device}")
    print(f"with KV cache:    {n / times[True]:8.1f} tokens/s ({times[True]:.2f} s)")
    print(f"without (recompute every step): {n / times[False]:8.1f} tokens/s ({times[False]:.2f} s)")
    print(f"same tokens: {outs[True] == outs[False]}")
    print(f"kv_cache_speedup={times[False] / times[True]:.3f}")


if __name__ == "__main__":
    main()
