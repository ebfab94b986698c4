"""Reference pretraining: CLIP, SigLIP, the SILC Table 6 ablation rows, SILC-C and SILC-S.

    silc-bench pretrain --config configs/pretrain/toy_silc_c.yaml --out runs/toy_silc_c
    torchrun --nproc_per_node 8 -m silc_bench.pretrain.trainer --config ... --out ... [--resume]

One loop for every variant; a variant is a set of switches (VARIANTS), a config may override each.
- loss "softmax" (CLIP InfoNCE) or "sigmoid" (SigLIP, with the bias `b`), always over the global
  batch: embeddings are all-gathered with gradients (see objectives.py for why the gradient is exact).
- contrastive_views: "full" = the whole image resized to the global size (CLIP / SigLIP input);
  "global" = each of the 2 global crops, every one contrasted with the same texts and batch size
  (SILC), the loss averaged over views; "local" = the local crops (not used by a paper row).
- ema: keep an EMA teacher of the whole student (both towers, t, b, head) with fixed momentum
  0.966. The EMA weights are the ones exported for evaluation. (The paper says the teacher is
  evaluated; EMA-ing the text tower too keeps the exported towers aligned. Decision, documented.)
- distill: SILC self-distillation, teacher on global views, student on local views, DINO head.
  L = L_contrastive + weight * L_self-dist.

Data: sample position p = step * global_batch + i -> dataset index p % length, crops seeded by
(seed, p). The global batch of a step never depends on the number of processes, so a run on N
processes matches a run on one, and a resumed run repeats the uninterrupted one exactly.
Outputs in --out: config.json, log.jsonl (loss per step), checkpoint.pt (atomic, latest),
model.npz + model.npz.json (big_vision export with the tokenizer), the tokenizer file. Rank 0
writes them; with several nodes, --out must be on a file system every process reads. Defaults:
settings.py; device, precision, processes, resume and the step loop: silc_bench.training.runtime.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from silc_bench.errors import UserError
from silc_bench.pretrain import objectives as obj
from silc_bench.pretrain.multicrop import MultiCropConfig, full_view, multicrop
from silc_bench.pretrain.schedule import rsqrt_lr
from silc_bench.pretrain.settings import OPEN_SECTIONS, RUNTIME_KEYS, TrainSettings, defaults
from silc_bench.recipes import merge_settings, read_recipe, run_main
from silc_bench.training import runtime as rt

VARIANTS = {
    "clip":           dict(loss="softmax", contrastive_views=["full"], ema=False, distill=False),
    "siglip":         dict(loss="sigmoid", contrastive_views=["full"], ema=False, distill=False),
    "clip+views":     dict(loss="softmax", contrastive_views=["global"], ema=False, distill=False),
    "clip+views+ema": dict(loss="softmax", contrastive_views=["global"], ema=True, distill=False),
    "silc-c":         dict(loss="softmax", contrastive_views=["global"], ema=True, distill=True),
    "silc-s":         dict(loss="sigmoid", contrastive_views=["global"], ema=True, distill=True),
}


# ---------------------------------------------------------------------------------- config
def _merge(base: dict, over: dict, path) -> dict:
    return merge_settings(base, over, path, what="pretraining", defaults_at="silc_bench/pretrain/settings.py",
                          open_sections=OPEN_SECTIONS)


def load_config(path=None, overrides: dict | None = None) -> dict:
    """YAML file (plain data) merged over the defaults (settings.py); `_config_dir` resolves relative files."""
    raw = read_recipe(path, "pretraining") if path is not None else {}
    cfg = _merge(defaults(), raw, path)
    cfg = _merge(cfg, overrides or {}, path)
    if cfg["variant"] not in VARIANTS:
        raise UserError(f"unknown variant {cfg['variant']!r}", path=path, fix=f"use one of {sorted(VARIANTS)}")
    cfg["objective"] = {**VARIANTS[cfg["variant"]], **cfg["objective"]}
    o = cfg["objective"]
    bad = set(o) - set(VARIANTS["clip"]) or set(o["contrastive_views"]) - {"full", "global", "local"}
    if bad or o["loss"] not in ("softmax", "sigmoid") or not o["contrastive_views"]:
        raise UserError(f"bad objective settings {o}", path=path,
                        fix="objective takes loss (softmax/sigmoid), contrastive_views (a non-empty list of "
                            "full/global/local), ema, distill")
    cfg["_config_dir"] = str(Path(path).resolve().parent) if path else None
    cfg["_config_path"] = str(path) if path else None
    return cfg


def _resolve_file(name: str, cfg: dict) -> Path:
    """A relative file is looked up next to the config, then inside the silc_bench package."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    pkg = Path(__file__).resolve().parent.parent
    for base in [cfg.get("_config_dir"), pkg]:
        if base and (Path(base) / p).exists():
            return Path(base) / p
    return p


def make_dataset(cfg: dict):
    data, path = cfg["data"], cfg.get("_config_path")
    if data.get("kind") == "toyworld":
        from silc_bench.data.toyworld import DEFAULT_WORLD, PretrainDataset

        try:
            return PretrainDataset(seed=data.get("seed", 0), length=data.get("length", 100_000),
                                   size=data.get("size", 64), world=data.get("world", DEFAULT_WORLD),
                                   background_mention_p=data.get("background_mention_p"),
                                   thing_mention_p=data.get("thing_mention_p"))
        except UserError as e:  # a bad `data` setting: name the recipe it came from
            if e.path is not None:
                raise
            raise UserError(e.message, path=path, fix=e.fix) from None
    raise UserError(f"no pretraining reader for data kind {data.get('kind')!r} (WebLI is not public)", path=path,
                    fix="use data: {kind: toyworld, ...} (configs/pretrain/toy_*.yaml) or add a reader here")


# ---------------------------------------------------------------------------------- models
class Student(nn.Module):
    """Everything that gets gradients, behind one forward so DDP sees one call per step."""

    def __init__(self, two_tower: nn.Module, head: nn.Module | None):
        super().__init__()
        self.model, self.head = two_tower, head

    def forward(self, views: dict, tokens: torch.Tensor, contrastive_views: list[str], distill: bool):
        emb = {}
        for name, x in views.items():  # one tower call per view size: [V, n, 3, S, S] -> [V, n, D]
            emb[name] = self.model.img(x.flatten(0, 1))[0].unflatten(0, x.shape[:2])
        zimg = obj.l2_normalize(torch.cat([emb[v] for v in contrastive_views]).float())
        ztxt = obj.l2_normalize(self.model.txt(tokens)[0].float())
        local = self.head(emb["local"]).float() if distill else None
        return zimg, ztxt, local, self.model.t, self.model.b


def build_student(cfg: dict) -> Student:
    from silc_bench.models.two_tower import TwoTower, TwoTowerConfig

    o = cfg["objective"]
    mcfg = dict(cfg["model"], bias=o["loss"] == "sigmoid")
    try:
        tt_cfg = TwoTowerConfig(**mcfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model settings ({e})", path=cfg.get("_config_path"),
                        fix="model takes img: ViTConfig fields, txt: TextConfig fields, temperature_init, bias_init")
    seed = int(cfg["train"]["seed"])
    model = TwoTower.from_config(tt_cfg, seed=seed)
    head = None
    if o["distill"]:
        d = cfg["distill"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            head = obj.DistillHead(tt_cfg.img.output_dim, d["out_dim"], d["hidden"], d["bottleneck"], d["layers"])
    return Student(model, head)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only Dense / Conv kernels (big_vision's default wd mask ".*/kernel$")."""
    decay, no_decay = [], []
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if name == "weight" and isinstance(m, (nn.Linear, nn.Conv2d)) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: dict, out_dir=None):
        self.cfg, self.out = cfg, Path(out_dir) if out_dir else None
        self.rank, self.world = rt.rank_world()
        self.folder = rt.RunFolder(self.out, self.rank) if self.out else None
        tr, o = cfg["train"], cfg["objective"]
        self.device = rt.choose_device(tr["device"])
        self.amp_dtype = rt.autocast_dtype(tr["precision"], self.device, path=cfg.get("_config_path"))
        self.global_batch = int(tr["batch_size"])
        self.local_batch = rt.local_batch_size(self.global_batch, self.world)
        self.total_steps = int(tr["steps"])
        op = cfg["optim"]
        if self.total_steps > 1 and op["warmup_steps"] >= self.total_steps:
            raise UserError(f"optim.warmup_steps ({op['warmup_steps']}) must be below train.steps ({self.total_steps})",
                            path=cfg.get("_config_path"), fix="lower warmup_steps or raise --steps")
        self.seed = int(tr["seed"])
        self.crops = MultiCropConfig.from_dict(cfg["multicrop"])
        self.need_crops = o["distill"] or bool({"global", "local"} & set(o["contrastive_views"]))

        from silc_bench.tokenizers import make_tokenizer

        tok_spec = dict(cfg["tokenizer"], file=str(_resolve_file(cfg["tokenizer"]["file"], cfg)))
        if not Path(tok_spec["file"]).is_file():
            raise UserError(f"tokenizer file {tok_spec['file']} not found", path=cfg.get("_config_path"),
                            fix="set tokenizer.file in the config (relative: next to the config or in silc_bench/)")
        self.tokenizer = make_tokenizer(tok_spec)
        self.dataset = make_dataset(cfg)

        self.student = build_student(cfg).to(self.device)
        self.teacher = None
        if o["ema"]:
            self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        k = cfg["distill"]["out_dim"]
        self.center = torch.zeros(k, device=self.device) if o["distill"] else None
        self.opt = torch.optim.AdamW(param_groups(self.student, op["weight_decay"]), lr=op["lr"],
                                     betas=tuple(op["betas"]), eps=op["eps"])
        self.scaler = rt.grad_scaler(self.amp_dtype)
        self.ddp = rt.wrap_ddp(self.student, self.device, self.world)
        self.step = 0
        self._pool = ThreadPoolExecutor(1) if tr["prefetch"] else None

    # ---- data
    def load_batch(self, step: int) -> dict:
        """This process's slice of global batch `step`: {"views": {name: [V, n, 3, S, S]}, "tokens": [n, L]}."""
        start = step * self.global_batch + self.rank * self.local_batch
        positions = list(range(start, start + self.local_batch))
        items = [self.dataset[p % len(self.dataset)] for p in positions]
        images = torch.stack([it["image"] for it in items])
        views = {}
        o = self.cfg["objective"]
        if "full" in o["contrastive_views"]:
            views["full"] = full_view(images, self.crops.global_size)[None]
        if self.need_crops:
            crops = multicrop(images, positions, self.seed, self.crops)
            if "global" in o["contrastive_views"] or o["distill"]:
                views["global"] = crops["global"]
            if "local" in o["contrastive_views"] or o["distill"]:
                views["local"] = crops["local"]
        return {"views": views, "tokens": self.tokenizer([it["caption"] for it in items])}

    def batches(self, start: int):
        """Batches from `start` on, the next one loading in a thread while this one trains."""
        nxt = self._pool.submit(self.load_batch, start) if self._pool else None
        for step in range(start, self.total_steps):
            batch = nxt.result() if nxt else self.load_batch(step)
            if self._pool and step + 1 < self.total_steps:
                nxt = self._pool.submit(self.load_batch, step + 1)
            yield step, batch

    # ---- one step
    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world == 1:
            return x
        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
            warnings.simplefilter("ignore", FutureWarning)
            parts = torch.distributed.nn.functional.all_gather(x.contiguous())
        return torch.cat(parts, dim=dim)

    def contrastive_loss(self, zimg, ztxt, t, b) -> torch.Tensor:
        """zimg [V, n, D], ztxt [n, D]: the mean over views of the global-batch loss share."""
        offset, t = self.rank * self.local_batch, t.float().reshape(())
        all_txt = self._gather(ztxt, 0)
        if self.cfg["objective"]["loss"] == "sigmoid":
            b = b.float().reshape(())
            losses = [obj.siglip_loss(zi, ztxt, t, b, all_txt=all_txt, offset=offset) for zi in zimg]
        else:
            all_img = self._gather(zimg, 1)
            losses = [obj.clip_loss(zi, ztxt, t, all_img=ai, all_txt=all_txt, offset=offset)
                      for zi, ai in zip(zimg, all_img)]
        return torch.stack(losses).mean()

    def train_step(self, step: int, batch: dict) -> dict:
        o, d = self.cfg["objective"], self.cfg["distill"]
        op = self.cfg["optim"]
        lr = rsqrt_lr(step, total_steps=self.total_steps, base=op["lr"], warmup_steps=op["warmup_steps"],
                      cooldown_steps=op["cooldown_steps"], timescale=op["timescale"])
        for g in self.opt.param_groups:
            g["lr"] = lr
        views = {k: v.to(self.device, non_blocking=True) for k, v in batch["views"].items()}
        tokens = batch["tokens"].to(self.device, non_blocking=True)

        with rt.autocast(self.device, self.amp_dtype):
            zimg, ztxt, local_out, t, b = self.ddp(views, tokens, o["contrastive_views"], o["distill"])
            if o["distill"]:
                with torch.no_grad():
                    g = views["global"]
                    t_emb = self.teacher.model.img(g.flatten(0, 1))[0]
                    teacher_out = self.teacher.head(t_emb).float().unflatten(0, g.shape[:2])
        loss_c = self.contrastive_loss(zimg, ztxt, t, b)
        loss_d = torch.zeros((), device=self.device)
        if o["distill"]:
            loss_d = obj.distill_loss(local_out, teacher_out, self.center, student_temp=d["student_temp"],
                                      teacher_temp=d["teacher_temp"])
        loss = loss_c + d["weight"] * loss_d

        gnorm = rt.optimizer_step(loss, self.opt, self.scaler, self.student.parameters(), op["grad_clip"])

        if self.teacher is not None:
            obj.ema_update(self.teacher.parameters(), self.student.parameters(), self.cfg["ema_momentum"])
        if o["distill"]:
            self.center.copy_(obj.updated_center(self.center, teacher_out, d["center_momentum"]))

        stats = torch.stack([loss.detach(), loss_c.detach(), loss_d.detach()]).float()
        stats = rt.mean_over_processes(stats, self.world)
        out = dict(zip(("loss", "contrastive", "distill"), stats.tolist()))
        out.update(lr=lr, grad_norm=float(gnorm), t=float(t.detach().float().reshape(())))
        if b is not None:
            out["b"] = float(b.detach().float().reshape(()))
        return out

    # ---- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.folder.checkpoint

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt atomically (temp file, fsync, rename): a kill leaves the old one whole."""
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else {},
            "center": self.center if self.center is not None else torch.zeros(0),
            **rt.loop_state(self.opt, self.scaler),
            "config": json.dumps(rt.public(self.cfg), sort_keys=True),
        }
        rt.save_atomic(state, self.ckpt_path)

    def load_checkpoint(self, path: Path) -> None:
        state = rt.read_checkpoint(path, device=self.device)
        if not rt.same_settings(state["config"], rt.public(self.cfg), section=("train",), runtime_keys=RUNTIME_KEYS):
            raise UserError("the checkpoint was written with another config", path=path,
                            fix="resume with the same config (steps may not change either), or use a new --out")
        self.student.load_state_dict(state["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        if self.center is not None:
            self.center.copy_(state["center"])
        rt.restore_loop_state(state, self.opt, self.scaler)
        self.step = int(state["step"])

    # ---- export
    def eval_model(self) -> nn.Module:
        """The two-tower to evaluate: the EMA teacher's when there is one (as in SILC)."""
        return (self.teacher if self.teacher is not None else self.student).model

    def export(self) -> Path:
        from silc_bench.checkpoints.big_vision import save_big_vision

        tok = self.tokenizer.spec()
        src = Path(tok["file"])
        dst = self.out / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        tok["file"] = dst.name  # relative: resolves next to the sidecar, so the folder is self-contained
        return save_big_vision(self.eval_model(), self.out / "model.npz", tokenizer=tok)

    # ---- the loop
    def run(self, resume: bool = False, *, stop_at_step: int | None = None, callbacks=()) -> Path | None:
        """Train from scratch or from --out/checkpoint.pt to the last step, then export; -> model.npz.
        `stop_at_step`: pause there with a checkpoint written (-> None); `callbacks`: called as
        callback(steps_done, stats) after each step (see runtime.run_steps)."""
        ckpt = self.folder.resume_from(resume)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        self.folder.start(rt.public(self.cfg), self.step)
        tr = self.cfg["train"]
        rt.run_steps(self, self.batches(self.step), self.folder, log_every=tr["log_every"], ckpt_every=tr["ckpt_every"],
                     print_every=tr["print_every"], line=self._line, timing=self._throughput,
                     stop_at_step=stop_at_step, callbacks=callbacks)
        path = self.out / "model.npz" if self.step == self.total_steps else None
        if path and self.rank == 0:
            self.export()
            which = "EMA teacher" if self.teacher is not None else "student"
            print(f"exported the {which} weights to {path} (+ {path.name}.json with the tokenizer)", flush=True)
        if self.world > 1:
            dist.barrier()
        return path

    def _throughput(self, seconds: float) -> dict:
        return {"images_per_s": self.global_batch / seconds}

    def _line(self, stats: dict) -> str:
        return (f"step {stats['step'] + 1}/{self.total_steps} loss {stats['loss']:.4f} (contrastive "
                f"{stats['contrastive']:.4f}, distill {stats['distill']:.4f}) lr {stats['lr']:.2e} "
                f"{stats['images_per_s']:.1f} images/s")


OVERRIDES = {"seed": ("train", "seed"), "steps": ("train", "steps")}  # option -> the setting it overrides


def command_line_overrides(args) -> dict | None:
    over: dict = {}
    for option, (section, key) in OVERRIDES.items():
        if getattr(args, option) is not None:
            over.setdefault(section, {})[key] = getattr(args, option)
    return over or None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="silc-bench pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML recipe (configs/pretrain/*.yaml)")
    ap.add_argument("--out", help="run folder: log, checkpoint, exported model")
    ap.add_argument("--seed", type=int,
                    help=f"overrides the recipe's train.seed (settings.py default: {TrainSettings.seed})")
    ap.add_argument("--steps", type=int,
                    help=f"overrides the recipe's train.steps, the schedule's length (settings.py default: "
                         f"{TrainSettings.steps})")
    ap.add_argument("--print-config", action="store_true", help="print every setting of the recipe and exit")
    rt.add_loop_arguments(ap)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    cfg = load_config(args.config, command_line_overrides(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(rt.public(cfg), sort_keys=False, default_flow_style=None), end="")
        return 0
    if not args.out:
        ap.error("the following arguments are required: --out")
    with rt.distributed():
        Trainer(cfg, args.out).run(resume=args.resume, stop_at_step=args.stop_at_step)
    return 0


if __name__ == "__main__":
    run_main(main)
