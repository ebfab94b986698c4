"""Training-step speed: SILC-C vs CLIP on the same model and batch, and our CLIP step vs open_clip's.

    python benchmarks/pretrain_step.py [--batch 64] [--rounds 5] [--steps 3] [--threads N] [--clock cpu]

All steps run in one process, interleaved round by round (clip, silc-c, ours-tok, open_clip, ...)
so that load from other processes hits every contender alike; each reports the median step time.
Data loading is excluded (batches are prepared beforehand): the numbers are the step itself.
On a machine shared with other jobs, `--threads 1 --clock cpu` (process CPU time, which a
single thread does not inflate by spin-waiting) gives steadier ratios than wall time.

- clip / silc-c: the toy recipe's model (configs/pretrain/toy_*.yaml: ViT-8 on 64 px, width 128,
  depth 4, MAP pooling; text 16 tokens), batch 64; silc-c adds 2 global + 8 local views, the EMA
  teacher and the K=2048 head.
- ours vs open_clip: the same shapes with "tok" (class-token) pooling and a 128-d image head, as
  open_clip's ViT pools; open_clip.CLIP with an equal ViT and text tower, open_clip.loss.ClipLoss,
  the same AdamW settings and gradient clipping, fp32 on CPU.
Last line: `silc_over_clip_step_cost=X clip_step_vs_open_clip=Y` (time ratios; Y <= 1.05 wanted).

`--breakdown` instead times the pieces of one SILC-C step separately (each piece's forward and,
where it trains, backward): the 2 global student views, the 8 local student views, the text
tower, the EMA teacher on the global views with its head, the distillation head, the EMA update,
and the optimizer step; plus the batch loading and multi-crop that the prefetch thread runs
beside the step. Pieces are timed alone, so they need not add up exactly to the whole step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def our_trainer(variant_file: str, batch: int, pool: str = "map"):
    from silc_bench.pretrain.trainer import Trainer, load_config

    over = {"train": {"batch_size": batch, "steps": 10_000, "prefetch": False}, "optim": {"warmup_steps": 0}}
    if pool != "map":
        over["model"] = {"img": {"pool_type": pool, "out_dim": 128}}
    tr = Trainer(load_config(ROOT / "configs" / "pretrain" / variant_file, over), None)
    data = tr.load_batch(0)
    state = {"step": 0}

    def step():
        tr.train_step(state["step"], data)
        state["step"] += 1

    return step, data


def open_clip_step(batch: int, images: torch.Tensor, tokens: torch.Tensor):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(
        embed_dim=128,
        vision_cfg=CLIPVisionCfg(layers=4, width=128, head_width=32, patch_size=8, image_size=64),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=256, width=128, heads=4, layers=4),
    )
    loss_fn = open_clip.loss.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

    def step():
        img_f, txt_f, scale = model(images, tokens)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss.detach())

    return step


def silc_breakdown(batch: int, repeats: int, clock) -> None:
    from silc_bench.pretrain import objectives as obj
    from silc_bench.pretrain.trainer import Trainer, load_config

    over = {"train": {"batch_size": batch, "steps": 10_000, "prefetch": False}, "optim": {"warmup_steps": 0}}
    tr = Trainer(load_config(ROOT / "configs" / "pretrain" / "toy_silc_c.yaml", over), None)
    batch_data = tr.load_batch(0)
    views, tokens, student = batch_data["views"], batch_data["tokens"], tr.student

    def tower(name):
        def run():
            x = views[name]
            student.model.img(x.flatten(0, 1))[0].float().sum().backward()
        return run

    def teacher():
        with torch.no_grad():
            tr.teacher.head(tr.teacher.model.img(views["global"].flatten(0, 1))[0])

    def head():
        n_local = views["local"].shape[0] * views["local"].shape[1]
        student.head(torch.randn(n_local, tr.teacher.model.img.config.output_dim, requires_grad=True)).sum().backward()

    def optimizer():
        for p in student.parameters():
            p.grad = torch.zeros_like(p)
        tr.opt.step()

    pieces = {
        "whole step": lambda: tr.train_step(0, batch_data),
        "student, 2 global views (fwd+bwd)": tower("global"),
        "student, 8 local views (fwd+bwd)": tower("local"),
        "text tower (fwd+bwd)": lambda: student.model.txt(tokens)[0].sum().backward(),
        "EMA teacher on 2 global views + head (fwd)": teacher,
        "distillation head, K=2048 (fwd+bwd)": head,
        "EMA update": lambda: obj.ema_update(tr.teacher.parameters(), student.parameters(), 0.966),
        "AdamW step": optimizer,
        "batch load + multi-crop (prefetch thread)": lambda: tr.load_batch(1),
    }
    med = {}
    for name, fn in pieces.items():
        fn()
        ts = []
        for _ in range(repeats):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        med[name] = statistics.median(ts)
    whole = med["whole step"]
    print(f"SILC-C step breakdown, batch {batch}, threads {torch.get_num_threads()}, median of {repeats}:")
    for name, v in med.items():
        print(f"  {name:45s} {v * 1e3:8.1f} ms  {100 * v / whole:5.1f}%")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time")
    ap.add_argument("--breakdown", action="store_true", help="time the pieces of a SILC-C step instead")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    if a.breakdown:
        silc_breakdown(a.batch, a.rounds, clock)
        return

    clip, _ = our_trainer("toy_clip.yaml", a.batch)
    silc, _ = our_trainer("toy_silc_c.yaml", a.batch)
    ours_tok, data = our_trainer("toy_clip.yaml", a.batch, pool="tok")
    oc = open_clip_step(a.batch, data["views"]["full"][0], data["tokens"])
    contenders = {"clip": clip, "silc-c": silc, "clip_tok_ours": ours_tok, "clip_tok_open_clip": oc}

    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up (allocator, first-call overheads)
        fn()
        fn()
    for _ in range(a.rounds):
        for name, fn in contenders.items():
            for _ in range(a.steps):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {a.batch}, threads {torch.get_num_threads()}, {a.rounds} rounds x {a.steps} steps, "
          f"median {a.clock} time per step:")
    for k, v in med.items():
        print(f"  {k:20s} {v * 1e3:8.1f} ms  {a.batch / v:8.1f} images/s")
    x = med["silc-c"] / med["clip"]
    y = med["clip_tok_ours"] / med["clip_tok_open_clip"]
    print(f"silc_over_clip_step_cost={x:.3f} clip_step_vs_open_clip={y:.3f}")


if __name__ == "__main__":
    main()
