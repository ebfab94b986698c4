"""The training runtime every silc-bench trainer shares (pretrain/trainer.py, catseg/train.py).

- device and precision: `choose_device`, `set_threads`, `autocast_dtype`, `autocast`,
  `grad_scaler`, `optimizer_step`;
- processes under torchrun: `distributed()` (join and leave the process group), `rank_world`,
  `local_batch_size`, `wrap_ddp`, `mean_over_processes`;
- resume state: `loop_state` / `restore_loop_state` (optimizer, loss scaler, RNG states),
  `save_atomic`, `read_checkpoint`, `same_settings`;
- the run folder and the step loop: `RunFolder` (config.json, log.jsonl, checkpoint.pt; rank 0
  writes them), `run_steps`, and `add_loop_arguments` for the options every trainer takes.

A trainer owns its model, data and loss. What happens after each step, and in which order, is
fixed here: log line, printed line, checkpoint when due, callbacks, pause.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from silc_bench.errors import UserError
from silc_bench.results.record import atomic_write_bytes, atomic_write_text

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------- device, precision
def choose_device(setting: str = "auto") -> torch.device:
    """"auto": this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if setting == "auto":
        setting = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def set_threads(threads: int | None) -> None:
    """CPU intra-op threads (on small shared machines 1 avoids contention stalls); None: torch's."""
    if threads:
        torch.set_num_threads(int(threads))


def autocast_dtype(precision: str, device: torch.device, *, path=None) -> torch.dtype | None:
    """"auto": bf16 on GPUs that have it, else fp16 on GPUs, fp32 (None: no autocast) on CPU."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", path=path, fix="use auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(dtype: torch.dtype | None):
    """A loss scaler for fp16 (its gradients underflow without one); None otherwise."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def optimizer_step(loss: torch.Tensor, opt, scaler, params, grad_clip: float | None) -> torch.Tensor:
    """Backward (scaled under fp16), clip the global gradient norm, update. -> the norm before clipping.
    With a scaler the update is skipped when fp16 gradients overflowed."""
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return gnorm


# ---------------------------------------------------------------------------------- processes
def setup_distributed() -> None:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed():
    """`with distributed():` around a trainer's work: joins torchrun's group, always leaves it."""
    setup_distributed()
    try:
        yield rank_world()
    finally:
        teardown_distributed()


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_batch_size(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise UserError(f"batch_size {global_batch} is not divisible by {world} processes",
                        fix="choose a batch size that is a multiple of the number of processes")
    return global_batch // world


def wrap_ddp(module: torch.nn.Module, device: torch.device, world: int, **options):
    """DistributedDataParallel over `module` with several processes; the module itself with one."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **options)


def mean_over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    """In place: the mean of `values` over all processes (for logged statistics)."""
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


# ---------------------------------------------------------------------------------- resume state
def loop_state(opt, scaler) -> dict:
    """What exact resume needs beside the weights: optimizer, loss scaler, RNG states."""
    return {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_loop_state(state: dict, opt, scaler) -> None:
    opt.load_state_dict(state["optimizer"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if torch.cuda.is_available() and state["rng_cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temp file + fsync + rename: a kill leaves the previous file whole."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: Path, *, device, what: str = "training") -> dict:
    """A training checkpoint, tensors and plain data only (`weights_only`: nothing is unpickled)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read the {what} checkpoint ({e})", path=path,
                        fix="delete it to start over, or point --out at the run to resume") from e


def same_settings(saved: str, current: dict, *, section: tuple[str, ...], runtime_keys: Iterable[str]) -> bool:
    """Whether a checkpoint's settings (`saved`, JSON) are the current ones, leaving out the keys of
    `section` that may change when a run resumes (checkpoint interval, logging, device, ...)."""
    def comparable(settings: dict) -> dict:
        settings = copy.deepcopy(settings)
        inner = settings
        for key in section:
            inner = inner[key]
        for key in runtime_keys:
            inner.pop(key, None)
        return settings

    return comparable(json.loads(saved)) == comparable(json.loads(json.dumps(current, sort_keys=True)))


def public(settings: dict) -> dict:
    """Settings without the `_`-prefixed bookkeeping keys (where the config file was, ...)."""
    return {k: v for k, v in settings.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------- schedule
def warmup_cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (scenic's schedule shape)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------------------------- run folder, loop
class RunFolder:
    """A training run's folder: config.json, log.jsonl (one JSON line per logged step) and
    checkpoint.pt (the latest, written atomically). Only rank 0 writes."""

    def __init__(self, out, rank: int = 0):
        self.out, self.rank = Path(out), rank
        self.checkpoint, self.log_path = self.out / "checkpoint.pt", self.out / "log.jsonl"

    def resume_from(self, resume: bool, what: str = "training") -> Path | None:
        """The checkpoint to continue from, None for a fresh run; an existing one needs --resume."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.checkpoint.exists():
            return None
        if not resume:
            raise UserError(f"this output folder already holds a {what} checkpoint", path=self.checkpoint,
                            fix="pass --resume to continue it, or choose another --out")
        return self.checkpoint

    def start(self, description: dict, step: int) -> None:
        """Write config.json and drop log lines of steps at or after `step` (logged by a run killed
        after its last checkpoint), so the log holds each step once."""
        if self.rank != 0:
            return
        atomic_write_text(self.out / "config.json", json.dumps(description, indent=1))
        if self.log_path.exists():
            keep = [ln for ln in self.log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
            atomic_write_text(self.log_path, "".join(ln + "\n" for ln in keep))

    def open_log(self):
        return open(self.log_path, "a") if self.rank == 0 else None


class Steppable(Protocol):
    """What `run_steps` drives: a trainer with a step counter, a step and a checkpoint writer."""

    step: int
    total_steps: int

    def train_step(self, step: int, batch) -> dict: ...

    def save_checkpoint(self) -> None: ...


def run_steps(trainer: Steppable, batches: Iterable, folder: RunFolder, *, log_every: int, ckpt_every: int,
              print_every: int | None = None, line: Callable[[dict], str] | None = None,
              timing: Callable[[float], dict] | None = None, stop_at_step: int | None = None,
              callbacks: Iterable[Callable[[int, dict], None]] = ()) -> list[dict]:
    """Train on `batches` ((step, batch) pairs from `trainer.step` on); -> the steps' statistics.

    After each step: a log line every `log_every` steps and at the last one, a printed `line(stats)`
    every `print_every` (default `log_every`), a checkpoint every `ckpt_every` and at the last
    step, then each `callback(steps_done, stats)`. `stop_at_step`: pause once that many steps are
    done, with a checkpoint written, for `--resume` to continue (a run in a time-limited job slot).
    The run finished when `trainer.step == trainer.total_steps` afterwards.
    """
    if stop_at_step is not None and stop_at_step <= trainer.step:
        raise UserError(f"--stop-at-step {stop_at_step} is not after step {trainer.step}, where this run stands",
                        path=folder.checkpoint, fix="pass a later step, or leave --stop-at-step out")
    timing = timing or (lambda seconds: {"seconds": seconds})
    print_every = print_every or log_every
    callbacks = list(callbacks)
    records, log = [], folder.open_log()
    try:
        tick = time.perf_counter()
        for step, batch in batches:
            stats = trainer.train_step(step, batch)
            trainer.step = done = step + 1
            now = time.perf_counter()
            stats = {"step": step, **stats, **timing(now - tick)}
            tick = now
            records.append(stats)
            last = done == trainer.total_steps
            if log and (step % log_every == 0 or last):
                log.write(json.dumps(stats) + "\n")
                log.flush()
            if log and line and (step % print_every == 0 or last):
                print(line(stats), flush=True)
            pause = stop_at_step is not None and done == stop_at_step and not last
            if done % ckpt_every == 0 or last or pause:
                trainer.save_checkpoint()
            for callback in callbacks:
                callback(done, stats)
            if pause:
                if log:
                    print(f"stopped after step {done} of {trainer.total_steps} (checkpoint written); "
                          "continue with --resume", flush=True)
                break
    finally:
        if log:
            log.close()
    return records


def start_head_trainer(trainer, cfg: dict, model_spec: str, out_dir, *, checkpoint_dir=None, backbone=None):
    """The set-up every trainer of a head on a backbone shares (cat-seg, owl-det, lit-decoder): run
    folder, rank, device, threads, precision, batch / steps / seed from `cfg["train"]`, and the
    backbone (loaded from `model_spec` unless given) with its recorded spec and sha256. -> backbone."""
    from silc_bench.checkpoints.catseg import portable_spec

    trainer.cfg, trainer.out = cfg, Path(out_dir)
    trainer.rank, trainer.world = rank_world()
    trainer.folder = RunFolder(trainer.out, trainer.rank)
    tr = cfg["train"]
    trainer.device = choose_device(tr["device"])
    set_threads(tr["threads"])
    trainer.amp_dtype = autocast_dtype(tr["precision"], trainer.device, path=cfg.get("_config_path"))
    trainer.batch, trainer.total_steps, trainer.seed = int(tr["batch_size"]), int(tr["steps"]), int(tr["seed"])
    trainer.local_batch = local_batch_size(trainer.batch, trainer.world)
    if backbone is None:
        from silc_bench.checkpoints import load_model

        backbone = load_model(model_spec, checkpoint_dir=checkpoint_dir, device=trainer.device)
    trainer.spec = portable_spec(model_spec)
    trainer.backbone_sha = backbone.provenance.get("sha256")
    return backbone


def head_trainer_parser(prog: str, description: str, config_help: str, out_help: str) -> argparse.ArgumentParser:
    """The command line of every trainer of a head on a backbone (cat-seg, owl-det, lit-decoder)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--model", required=True, help="backbone: registry name, .npz, open_clip:ARCH[:WEIGHTS], hf:DIR")
    ap.add_argument("--config", required=True, help=config_help)
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--data-root", help="dataset root (else $SILC_BENCH_DATA, else ~/data)")
    ap.add_argument("--checkpoint-dir", help="where registry checkpoints live")
    ap.add_argument("--steps", type=int, help="overrides train.steps (the schedule's length)")
    ap.add_argument("--seed", type=int, help="overrides train.seed")
    add_loop_arguments(ap)
    return ap


def head_trainer_main(argv, parser: argparse.ArgumentParser, load_config, trainer_cls, exported: str) -> int:
    """Parse, load the recipe (--steps / --seed on top), train under torchrun or alone, and say
    where the exported model went (`exported`: its file name in --out)."""
    args = parser.parse_args(argv)
    train = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = load_config(args.config, {"train": train} if train else None)
    cfg["_config_path"] = str(args.config)
    with distributed() as (rank, _):
        trainer = trainer_cls(cfg, args.model, args.out, data_root=args.data_root, checkpoint_dir=args.checkpoint_dir)
        trainer.run(resume=args.resume, stop_at_step=args.stop_at_step)
    if rank == 0 and trainer.step == trainer.total_steps:
        print(f"wrote {Path(args.out) / exported}")
    return 0


class ParameterCheckpoints:
    """Checkpoints and the loop for trainers whose trainable weights are exactly the parameters of
    `self.model` with requires_grad (owl-det, lit-decoder). The trainer provides: model, opt,
    scaler, folder, rank, world, step, total_steps, device, cfg, `_identity()`, `batches(start)`
    ((step, batch) pairs), `line(stats)`, `export()`, and `what` (its name in messages)."""

    what = "training"

    def trainable_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def ckpt_path(self) -> Path:
        return self.folder.checkpoint

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {"step": self.step, "trainable": self.trainable_state(), **loop_state(self.opt, self.scaler),
                 "identity": json.dumps(self._identity(), sort_keys=True)}
        save_atomic(state, self.ckpt_path)

    def load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path, device=self.device, what=self.what)
        if not same_settings(state["identity"], self._identity(), section=("config", "train"),
                             runtime_keys=self.runtime_keys):
            raise UserError("the checkpoint was written with another config, backbone or steps", path=path,
                            fix="resume with the same --model and config, or use a new --out")
        params = dict(self.model.named_parameters())
        if set(state["trainable"]) != {n for n, p in params.items() if p.requires_grad}:
            raise UserError("the checkpoint's trainable weights do not match this model", path=path,
                            fix="resume with the same --model and config")
        with torch.no_grad():
            for n, v in state["trainable"].items():
                params[n].copy_(v.to(params[n].device))
        restore_loop_state(state, self.opt, self.scaler)
        self.step = int(state["step"])

    def run(self, resume: bool = False, *, stop_at_step: int | None = None, callbacks=()) -> list[dict]:
        """Train to the end and export; -> the statistics of the steps run (see `run_steps`)."""
        ckpt = self.folder.resume_from(resume, self.what)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        self.folder.start(self._identity(), self.step)
        tr = self.cfg["train"]
        records = run_steps(self, self.batches(self.step), self.folder, log_every=tr["log_every"],
                            ckpt_every=tr["ckpt_every"], line=self.line, stop_at_step=stop_at_step, callbacks=callbacks)
        if self.step == self.total_steps and self.rank == 0:
            self.export()
        if self.world > 1:
            dist.barrier()
        return records


def add_loop_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every trainer's command line takes: --resume and --stop-at-step."""
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if it exists")
    ap.add_argument("--stop-at-step", type=int, metavar="N",
                    help="stop once N steps are done, with a checkpoint written (continue later with --resume)")
