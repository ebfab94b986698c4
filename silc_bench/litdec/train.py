"""LiT-Decoder training on a frozen backbone (plain PyTorch; DDP under torchrun).

    silc-bench train lit-decoder --model SPEC --config configs/lit_decoder/b16.yaml --out DIR [--resume]
    torchrun --nproc_per_node 4 -m silc_bench.litdec.train --model SPEC --config ... --out DIR

No LiT-Decoder code or recipe is public (docs/PROTOCOLS_T1_T4_T5.md B); what is chosen here is
written in the config and the exported json:
- multi-task mixing by configured weights (classification, captioning, question answering);
- teacher forcing with cross-entropy on the answer and EOS;
- AdamW with linear warm-up, then cosine decay, and global gradient-norm clipping;
- the backbone is frozen. `train.cache_features` keeps each image's backbone tokens after their
  first use, which is exact: there is no image augmentation.
Sample position p = step * batch + i draws its task and example from a seeded rng of (seed, p), so
a resumed run repeats the uninterrupted one exactly. Outputs in --out: config.json, log.jsonl,
checkpoint.pt (atomic); at the end litdec.safetensors + litdec.json (silc_bench/checkpoints/litdec.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from silc_bench import paths
from silc_bench.data.transforms import ImageTransform
from silc_bench.errors import UserError
from silc_bench.litdec.data import draw, open_sources
from silc_bench.litdec.model import DecoderConfig, LitDecoder
from silc_bench.litdec.text import TextCodec, prompt_text
from silc_bench.models.base import image_token_width
from silc_bench.recipes import merge_settings, read_recipe, run_main
from silc_bench.training import runtime as rt
from silc_bench.training.runtime import warmup_cosine_lr

DEFAULTS = {
    "decoder": {"width": 768, "depth": 6, "heads": 12, "mlp_dim": 3072, "max_len": 64},
    "text": {"tokenizer": None, "lowercase": True},
    "prompts": {"classification": "what is this", "captioning": "caption", "vqa": "answer {question}"},
    "data": {"toyworld": None, "sources": None, "weights": {"classification": 1.0, "captioning": 1.0, "vqa": 1.0}},
    "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 1000, "grad_clip": 1.0, "betas": [0.9, 0.999]},
    "train": {"batch_size": 256, "steps": 50_000, "seed": 0, "ckpt_every": 1000, "log_every": 20,
              "precision": "fp32", "device": "auto", "threads": None, "cache_features": True},
}
_RUNTIME = ("ckpt_every", "log_every", "device", "threads")
IGNORE = -100


def load_config(path=None, overrides: dict | None = None) -> dict:
    raw = read_recipe(path, "LiT-Decoder") if path is not None else {}
    kw = dict(what="LiT-Decoder training", defaults_at="silc_bench/litdec/train.py DEFAULTS",
              open_sections=("prompts",), replaced_sections=("data",))
    cfg = merge_settings(merge_settings(DEFAULTS, raw, path, **kw), overrides or {}, path, **kw)
    if not cfg["text"]["tokenizer"]:
        raise UserError("the LiT-Decoder config names no tokenizer", path=path,
                        fix="set text.tokenizer to a sentencepiece .model (relative paths: from the project folder)")
    return cfg


def tokenizer_path(name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else paths.PROJECT_DIR / p


def encode_example(codec: TextCodec, prompts: dict, kind: str, question, target: str, max_len: int):
    """-> (token ids [BOS prompt target EOS], index where the loss starts); the target is cut to fit."""
    prompt = codec.encode(prompt_text(prompts, kind, question))
    room = max_len - 2 - len(prompt)
    if room < 1:
        raise UserError(f"a {kind} prompt of {len(prompt)} tokens leaves no room in decoder.max_len {max_len}",
                        fix="raise decoder.max_len or shorten the prompt")
    target_ids = codec.encode(target)[:room]
    return [codec.bos] + prompt + target_ids + [codec.eos], 1 + len(prompt)


def collate(examples: list[tuple[list[int], int]], pad: int):
    """Left-padded ids, key mask, and next-token targets (IGNORE outside the answer and EOS)."""
    width = max(len(s) for s, _ in examples)
    b = len(examples)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    target = torch.full((b, width), IGNORE, dtype=torch.long)
    for i, (seq, start) in enumerate(examples):
        off = width - len(seq)
        ids[i, off:] = torch.tensor(seq)
        mask[i, off:] = True
        for j in range(start, len(seq)):  # the token at j is predicted at position j - 1
            target[i, off + j - 1] = seq[j]
    return ids, mask, target


class Trainer(rt.ParameterCheckpoints):
    what = "LiT-Decoder training"
    runtime_keys = _RUNTIME

    def __init__(self, cfg: dict, model_spec: str, out_dir, *, data_root=None, checkpoint_dir=None, backbone=None):
        backbone = rt.start_head_trainer(self, cfg, model_spec, out_dir, checkpoint_dir=checkpoint_dir, backbone=backbone)
        self.codec = TextCodec(tokenizer_path(cfg["text"]["tokenizer"]), cfg["text"]["lowercase"])
        width = image_token_width(backbone.to(self.device))
        torch.manual_seed(self.seed)
        dec_cfg = DecoderConfig(**cfg["decoder"], vocab_size=self.codec.vocab_size)
        self.model = LitDecoder(backbone.to(self.device), dec_cfg, image_width=width).to(self.device)
        self.transform = ImageTransform(backbone.preprocess)
        self.sources = open_sources(cfg["data"], data_root)
        self.cache: dict | None = {} if cfg["train"]["cache_features"] else None
        op = cfg["optim"]
        self.params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=op["lr"], betas=tuple(op["betas"]), weight_decay=op["weight_decay"])
        self.scaler = rt.grad_scaler(self.amp_dtype)
        self.ddp = rt.wrap_ddp(_TeacherForcing(self.model), self.device, self.world)
        self.step = 0

    def _tokens(self, images: list, keys: list) -> torch.Tensor:
        todo = [i for i, k in enumerate(keys) if self.cache is None or k not in self.cache]
        if todo:
            pixels = torch.stack([self.transform(images[i]) for i in todo]).to(self.device)
            fresh = self.model.image_tokens(pixels)
            if self.cache is not None:
                for j, i in enumerate(todo):
                    self.cache[keys[i]] = fresh[j].cpu()
        if self.cache is None:
            return fresh
        return torch.stack([self.cache[k] for k in keys]).to(self.device)

    def batch_for(self, step: int):
        examples, images, keys = [], [], []
        c = self.cfg
        for i in range(self.local_batch):
            pos = step * self.batch + self.rank * self.local_batch + i
            kind, src, idx, rng = draw(self.sources, c["data"]["weights"], self.seed, pos)
            key = src.key(idx)
            image, question, targets = src.get(idx, rng)
            examples.append(encode_example(self.codec, c["prompts"], kind, question, targets[0],
                                           c["decoder"]["max_len"]))
            images.append(image)
            keys.append(key)
        return self._tokens(images, keys), *collate(examples, self.codec.pad)

    def train_step(self, step: int, batch) -> dict:
        op = self.cfg["optim"]
        lr = warmup_cosine_lr(step, self.total_steps, op["lr"], int(op["warmup_steps"]))
        for g in self.opt.param_groups:
            g["lr"] = lr
        tokens, ids, mask, target = batch
        self.model.train()
        with rt.autocast(self.device, self.amp_dtype):
            logits = self.ddp(tokens, ids.to(self.device), mask.to(self.device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.to(self.device).flatten(), ignore_index=IGNORE)
        gnorm = rt.optimizer_step(loss, self.opt, self.scaler, self.params, op["grad_clip"])
        stat = rt.mean_over_processes(loss.detach().float().reshape(1), self.world)
        return {"loss": float(stat), "lr": lr, "grad_norm": float(gnorm)}

    def _identity(self) -> dict:
        return {"config": rt.public(self.cfg), "spec": self.spec, "backbone_sha256": self.backbone_sha,
                "tokenizer_sha256": self.codec.describe()["sha256"]}

    def batches(self, start: int):
        return ((s, self.batch_for(s)) for s in range(start, self.total_steps))

    @staticmethod
    def line(st: dict) -> str:
        return f"step {st['step']}: loss {st['loss']:.4f} lr {st['lr']:.2e}"

    def export(self) -> Path:
        from silc_bench.checkpoints.litdec import save_litdec

        return save_litdec(self.model, self.out, backbone_spec=self.spec, backbone_sha256=self.backbone_sha,
                           codec=self.codec, prompts=self.cfg["prompts"],
                           training={**rt.public(self.cfg), "steps_done": self.step})


class _TeacherForcing(torch.nn.Module):
    """The decoder's teacher-forcing pass as a module's forward (what DDP wraps)."""

    def __init__(self, model: LitDecoder):
        super().__init__()
        self.model = model

    def forward(self, tokens, ids, mask):
        return self.model.logits(tokens, ids, mask)


def build_parser():
    return rt.head_trainer_parser("silc-bench train lit-decoder", __doc__.split("\n")[0],
                                  "YAML recipe (configs/lit_decoder/*.yaml)",
                                  "run folder: log, checkpoint, litdec.safetensors + litdec.json")


def main(argv=None) -> int:
    return rt.head_trainer_main(argv, build_parser(), load_config, Trainer, "litdec.json")


if __name__ == "__main__":
    run_main(main)
