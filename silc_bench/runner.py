"""Task-agnostic runner: task spec + model + datasets -> harness -> result records.

It knows nothing task-specific: a task spec names its harness module (silc_bench.harness.<name>),
which provides `open_dataset`, `setup`, `evaluate` (mergeable state for a list of indices) and
`finalize` (state -> metrics).
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from silc_bench import registry
from silc_bench.checkpoints import load_catseg_model, load_model
from silc_bench.errors import UserError
from silc_bench.hashing import sha256_json
from silc_bench.results.record import environment, now_iso, read_record, record_path, write_record
from silc_bench.workfiles import Cache, load_tensors, save_tensors


@dataclass
class RunOptions:
    data_root: str | None = None
    out_dir: str | Path = "results/runs"
    checkpoint_dir: str | None = None
    tokenizer: str | None = None
    device: str = "cpu"
    batch_size: int = 16
    workers: int = 0
    limit: int | None = None
    protocol_overrides: dict | None = None
    force: bool = False
    progress: bool = True
    cache: bool = True
    shard_size: int = 32


def harness_module(task: dict):
    return importlib.import_module(f"silc_bench.harness.{task['harness']}")


def protocol_for(task: dict, dataset, overrides: dict | None) -> dict:
    """Task protocol, then the dataset's own overrides for this task (e.g. toy-world image sizes),
    then the user's."""
    protocol = dict(task.get("protocol", {}))
    protocol.update(((getattr(dataset, "spec", None) or {}).get("protocol") or {}).get(task["name"], {}))
    protocol.update(overrides or {})
    return protocol


def output_path(task_name: str, model_spec: str, dataset_name: str, opts: RunOptions) -> Path:
    name = dataset_name if opts.limit is None else f"{dataset_name}@limit{opts.limit}"
    return record_path(opts.out_dir, task_name, model_spec, name)


MODEL_LOADERS = {"vlm": load_model, "catseg": load_catseg_model}


def load_for_task(task: dict, spec: str, opts: RunOptions):
    """The task spec says what `--model` names: a VLM (default) or, e.g., a trained CAT-Seg."""
    kind = task.get("model_loader", "vlm")
    if kind not in MODEL_LOADERS:
        raise UserError(f"task {task['name']!r} asks for unknown model_loader {kind!r}", path=task.get("_path"),
                        fix=f"use one of: {', '.join(MODEL_LOADERS)}")
    extra = {"tokenizer": opts.tokenizer} if kind == "vlm" else {}
    return MODEL_LOADERS[kind](spec, checkpoint_dir=opts.checkpoint_dir, device=opts.device, **extra)


def describe_model(model) -> dict:
    """The model's own description plus how it was named and loaded (its provenance)."""
    info = dict(model.describe())
    for key, value in (getattr(model, "provenance", None) or {}).items():
        info.setdefault(key, value)
    return info


def describe_dataset(dataset, name: str, limit: int | None) -> dict:
    classnames = getattr(dataset, "classnames", None)
    return {
        "name": name,
        "num_images": len(dataset),
        "limited": limit is not None,
        "limit": limit,
        "num_classes": getattr(dataset, "num_classes", None),
        "classnames_sha256": sha256_json(classnames) if classnames is not None else None,
        "root": str(getattr(dataset, "root", "")) or None,
    }


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(state: dict, device) -> dict:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return state
    out = {}
    for k in sorted(state):
        t = state[k].to(device).clone()
        dist.all_reduce(t)
        out[k] = t.cpu()
    return out


def _sum_states(states: list[dict]) -> dict:
    total = {k: v.clone() for k, v in states[0].items()}
    for st in states[1:]:
        for k in total:
            total[k] += st[k]
    return total


def evaluate_one(task: dict, model, model_spec: str, dataset_name: str, opts: RunOptions) -> dict | None:
    """Evaluate one (model, dataset) pair; returns its record on rank 0 (None on other ranks).

    Images are cut into shards of `opts.shard_size`; each finished shard's metric state is saved,
    so a killed run recomputes only unfinished shards. Under torchrun, rank r takes shards
    r, r + world, ...; states are summed across ranks (integer counts: exact whatever the split).
    """
    rank, world = _distributed()
    harness = harness_module(task)
    dataset = harness.open_dataset(dataset_name, opts.data_root, limit=opts.limit)
    protocol = protocol_for(task, dataset, opts.protocol_overrides)
    start = time.perf_counter()
    cache = Cache(Path(opts.out_dir) / "cache") if opts.cache else None
    prepared = harness.setup(model, dataset, protocol, opts.device, cache=cache)
    description = describe_dataset(dataset, dataset_name, opts.limit)
    model_info = describe_model(model)
    work_key = sha256_json({"task": task["version"], "model": model_info, "dataset": description, "protocol": protocol,
                            "details": prepared.details})
    work_dir = output_path(task["name"], model_spec, dataset_name, opts).parent / "shards" / f"{dataset_name}-{work_key[:16]}"
    n = len(dataset)
    shards = [range(i, min(i + opts.shard_size, n)) for i in range(0, n, opts.shard_size)]
    progress = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=n, desc=f"{task['name']} {model_spec} {dataset_name}", unit="img", file=sys.stderr)
    states, computed, reused = [], 0, 0
    try:
        for k, indices in enumerate(shards):
            if k % world != rank:
                continue
            path = work_dir / f"shard{k:05d}.pt"
            state = load_tensors(path)
            if state is None:
                state = harness.evaluate(model, dataset, prepared, indices, device=opts.device,
                                         batch_size=opts.batch_size, workers=opts.workers, progress=progress)
                save_tensors(path, state)
                computed += 1
            else:
                reused += 1
                if progress is not None:
                    progress.update(len(indices))
            states.append(state)
    finally:
        if progress is not None:
            progress.close()
    if not states:  # more ranks than shards
        states = [harness.evaluate(model, dataset, prepared, [], device=opts.device, batch_size=opts.batch_size)]
    state = _all_reduce_sum(_sum_states(states), opts.device)
    if rank != 0:
        return None
    metrics, per_class = harness.finalize(dataset, state)
    wall = time.perf_counter() - start
    return {
        "schema": "silc-bench/result/v1",
        "created": now_iso(),
        "task": {"name": task["name"], "version": task["version"], "spec_sha256": sha256_json(
            {k: v for k, v in task.items() if not k.startswith("_")})},
        "model": model_info,
        "dataset": description,
        "protocol": protocol,
        "protocol_sha256": sha256_json(protocol),
        "details": prepared.details,
        "metrics": metrics,
        "per_class": per_class,
        "environment": environment(opts.device),
        "timing": {"wall_seconds": wall, "images_per_second": n / wall if wall > 0 else None,
                   "batch_size": opts.batch_size, "workers": opts.workers, "world_size": world,
                   "note": "timing covers this invocation only (reused shards take no time)" if reused else None},
        "_work": {"dir": str(work_dir), "shards": len(shards), "computed": computed, "reused": reused},
    }


def run(task_name: str, model_specs: list[str], dataset_names: list[str] | None, opts: RunOptions) -> list[dict]:
    """Every (model, dataset) pair; pairs with a record already written are skipped unless `force`."""
    task = registry.task_spec(task_name)
    dataset_names = dataset_names or task["datasets"]
    _distributed()
    records = []
    for model_spec in model_specs:
        todo = [d for d in dataset_names if opts.force or not _valid_record(output_path(task_name, model_spec, d, opts))]
        todo = _agree_on(todo)
        for d in set(dataset_names) - set(todo):
            print(f"skip {task_name} {model_spec} {d}: record exists ({output_path(task_name, model_spec, d, opts)}); "
                  "--force to recompute", file=sys.stderr)
        if not todo:
            continue
        model = load_for_task(task, model_spec, opts)
        for dataset_name in todo:
            path = output_path(task_name, model_spec, dataset_name, opts)
            if opts.force:
                for old in (path.parent / "shards").glob(f"{dataset_name}-*"):
                    shutil.rmtree(old, ignore_errors=True)
            record = evaluate_one(task, model, model_spec, dataset_name, opts)
            if record is None:  # not rank 0
                continue
            work = record.pop("_work")
            write_record(path, record)
            shutil.rmtree(work["dir"], ignore_errors=True)
            print(f"wrote {path} (shards computed {work['computed']}, reused {work['reused']})", file=sys.stderr)
            record["_path"], record["_work"] = str(path), work
            records.append(record)
    return records


def _valid_record(path: Path) -> bool:
    """A complete record exists; a damaged one is reported and recomputed, never reused."""
    if not path.exists():
        return False
    try:
        read_record(path)
        return True
    except UserError as e:
        print(f"silc-bench: recomputing: {e}", file=sys.stderr)
        return False


def _agree_on(value):
    """Rank 0's value on every rank (ranks must agree on which pairs to run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def parse_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"empty list {text!r}", fix="give comma-separated names, e.g. ade150,pc59")
    return items
