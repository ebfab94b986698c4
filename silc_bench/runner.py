"""Task-agnostic runner: task spec + model + datasets -> harness -> result records.

It knows nothing task-specific and names no task and no model kind: a task spec names its harness
(silc_bench/harness/__init__.py `HARNESSES`), and the harness says which model loader it needs and
owns datasets, setup, per-shard evaluation, merging and metrics (contract: silc_bench/harness/base.py).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from silc_bench import paths, registry
from silc_bench.checkpoints import get_loader
from silc_bench.errors import UserError
from silc_bench.harness import get_harness
from silc_bench.harness.base import EXAMPLES, SUMS, Harness, merge_results
from silc_bench.harness.predictions import prediction_format
from silc_bench.hashing import sha256_dir, sha256_file, sha256_json
from silc_bench.precision import autocast, compile_model
from silc_bench.precision import describe as describe_precision
from silc_bench.results.record import environment, now_iso, read_record, record_path, slug, write_record
from silc_bench.workfiles import Cache, load_tensors, save_tensors


@dataclass
class RunOptions:
    data_root: str | None = None
    out_dir: str | Path = "results/runs"
    checkpoint_dir: str | None = None
    tokenizer: str | None = None
    device: str = "cpu"
    batch_size: int | None = None  # None: the harness's default_batch_size for the model and device
    workers: int = 0
    limit: int | None = None
    protocol_overrides: dict | None = None
    force: bool = False
    progress: bool = True
    cache: bool = True
    shard_size: int = 32
    precision: str = "fp32"  # fp32 | bf16 | fp16 (silc_bench/precision.py); part of the record's identity
    compile: bool = False    # torch.compile the model (silc_bench/precision.py); part of the record's identity
    save_predictions: bool = False  # per-image class maps beside the record (harnesses with `saves_predictions`)


def protocol_for(task: dict, dataset, overrides: dict | None) -> dict:
    """Task protocol, then the dataset's own overrides for this task, then the user's."""
    return get_harness(task).protocol_for(dataset, overrides)


def output_path(task_name: str, model_spec: str, dataset_name: str, opts: RunOptions) -> Path:
    name = dataset_name if opts.limit is None else f"{dataset_name}@limit{opts.limit}"
    if opts.precision != "fp32":  # never mixed with (or skipped because of) the fp32 record
        name += f"@{opts.precision}"
    if opts.compile:  # compiled kernels round differently: their own record
        name += "@compiled"
    return record_path(opts.out_dir, task_name, model_folder(model_spec, opts), name)


def load_for_task(harness: Harness, spec: str, opts: RunOptions):
    """Load what `--model` names with the loader the harness asks for."""
    loader = get_loader(harness.model_loader)
    extra = {"tokenizer": opts.tokenizer} if opts.tokenizer else {}
    return loader(spec, checkpoint_dir=opts.checkpoint_dir, device=opts.device, **extra)


# ---------------------------------------------------------------------- names and paths in records
def _weights_file(spec: str) -> Path | None:
    """The file (or folder) a non-registry spec loads, to name its record folder by content."""
    if spec.startswith("open_clip:"):
        arch, _, weights = spec[len("open_clip:"):].partition(":")
        if arch in ("local-dir", "hf-hub"):
            return Path(weights) if arch == "local-dir" else None
        return Path(weights) if weights and Path(weights).exists() else None
    if spec.startswith("hf:"):
        return Path(spec[3:])
    path = Path(spec)
    return path if path.exists() else None


def _content_hash(p: Path) -> str:
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")) or sorted(p.glob("*.pt"))
        return sha256_json([sha256_file(f) for f in files]) if files else sha256_dir(p)
    return sha256_file(p)


def model_folder(spec: str, opts: RunOptions | None = None) -> str:
    """Record folder of a model: its registry name, else `<name>-<content hash>` (never a path slug)."""
    if spec in registry.models():
        return spec
    path = _weights_file(spec)
    if path is None or not path.exists():  # e.g. open_clip:ARCH:TAG (a tag, not a path)
        return slug(spec)
    digest = _content_hash(path)
    kind = spec.split(":", 1)[0] if ":" in spec else "npz" if spec.endswith(".npz") else "model"
    return f"{kind}-{slug(path.stem if path.is_file() else path.name)}-{digest[:12]}"


def declared_roots(opts: RunOptions) -> dict[str, str]:
    """The folders record paths are written relative to (name -> absolute folder)."""
    roots = {
        "<data>": paths.data_root(opts.data_root),
        "<checkpoints>": paths.checkpoint_dir(opts.checkpoint_dir),
        "<out>": Path(opts.out_dir),
        "<project>": paths.PROJECT_DIR,
        "<home>": Path.home(),
    }
    return {name: str(Path(p).expanduser().resolve()) for name, p in roots.items()}


_ABSOLUTE = re.compile(r"(?:(?<=^)|(?<=[:=,\s]))(/[^:,\s]+)")


def relativize(obj, roots: dict[str, str]):
    """Every absolute path in `obj` (strings, recursively) written relative to a declared root,
    the most specific first; a path under none keeps only its last component ("<external>/x")."""
    if isinstance(obj, dict):
        return {k: relativize(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [relativize(v, roots) for v in obj]
    if not isinstance(obj, str) or "/" not in obj:
        return obj
    ordered = sorted(roots.items(), key=lambda kv: -len(kv[1]))

    def one(match):
        text = match.group(1)
        for name, root in ordered:
            if text == root:
                return name
            if text.startswith(root.rstrip("/") + "/"):
                return name + text[len(root.rstrip("/")):]
        return "<external>/" + Path(text).name

    return _ABSOLUTE.sub(one, obj)


def describe_model(model) -> dict:
    """The model's own description plus how it was named and loaded (its provenance)."""
    info = dict(model.describe())
    for key, value in (getattr(model, "provenance", None) or {}).items():
        info.setdefault(key, value)
    return info


def describe_dataset(dataset, name: str, limit: int | None) -> dict:
    classnames = getattr(dataset, "classnames", None)
    info = {
        "name": name,
        "num_images": len(dataset),
        "limited": limit is not None,
        "limit": limit,
        "num_classes": getattr(dataset, "num_classes", None),
        "classnames_sha256": sha256_json(classnames) if classnames is not None else None,
        "root": str(getattr(dataset, "root", "")) or None,
    }
    if callable(getattr(dataset, "describe", None)):
        info.update(dataset.describe())
    return info


# ---------------------------------------------------------------------- processes
def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_to_rank0(result: dict, device) -> dict | None:
    """Combine every rank's merged shard result on rank 0 (None elsewhere): sums are reduced
    (small tensors), examples are sent to rank 0 only, so no other rank holds the full set."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return result
    rank, world = dist.get_rank(), dist.get_world_size()
    sums = result.get(SUMS) or {}
    reduced = {}
    for k in sorted(sums):
        t = sums[k].to(device).clone()
        dist.reduce(t, dst=0)
        reduced[k] = t.cpu()
    parts = [None] * world if rank == 0 else None
    dist.gather_object(result.get(EXAMPLES), parts, dst=0)
    if rank != 0:
        return None
    combined = merge_results([{EXAMPLES: p} for p in parts if p])
    if reduced:
        combined[SUMS] = reduced
    return combined


# ---------------------------------------------------------------------- one (model, dataset)
def evaluate_one(task: dict, model, model_spec: str, dataset_name: str, opts: RunOptions,
                 harness: Harness | None = None) -> dict | None:
    """Evaluate one (model, dataset) pair; returns its record on rank 0 (None on other ranks).

    Examples are cut into shards of `opts.shard_size`; each finished shard's result is saved
    atomically with a checksum, so a killed run recomputes only unfinished shards. Under
    torchrun, rank r takes shards r, r + world, ...; results are combined on rank 0 (sums added,
    per-example outputs put in index order), exact whatever the split.
    """
    rank, world = _distributed()
    harness = harness or get_harness(task)
    dataset = harness.open_dataset(dataset_name, opts.data_root, limit=opts.limit)
    protocol = harness.protocol_for(dataset, opts.protocol_overrides)
    start = time.perf_counter()
    cache_dir = Path(opts.out_dir) / "cache" / ("" if opts.precision == "fp32" else opts.precision)
    cache = Cache(cache_dir) if opts.cache else None
    with autocast(opts.precision, opts.device):
        prepared = harness.setup(model, dataset, protocol, opts.device, cache=cache)
    prediction_dir = None
    if opts.save_predictions:
        if not getattr(harness, "saves_predictions", False):
            raise UserError(f"task {task['name']!r} does not save per-image predictions",
                            fix="leave out --save-predictions (`silc-bench ls tasks`: the segmentation tasks save them)")
        record_file = output_path(task["name"], model_spec, dataset_name, opts)
        prediction_dir = record_file.with_name(record_file.stem + ".predictions")
        prepared.prediction_dir = str(prediction_dir)
    roots = declared_roots(opts)
    description = relativize(describe_dataset(dataset, dataset_name, opts.limit), roots)
    model_info = relativize(describe_model(model), roots)
    details = relativize(getattr(prepared, "details", {}) or {}, roots)
    work_key = sha256_json({"task": task["version"], "model": model_info, "dataset": description, "protocol": protocol,
                            "details": details, "precision": opts.precision, "compiled": opts.compile,
                            "predictions": opts.save_predictions})
    work_dir = output_path(task["name"], model_spec, dataset_name, opts).parent / "shards" / f"{dataset_name}-{work_key[:16]}"
    n = len(dataset)
    shards = [range(i, min(i + opts.shard_size, n)) for i in range(0, n, opts.shard_size)]
    progress = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=n, desc=f"{task['name']} {model_spec} {dataset_name}", unit="img", file=sys.stderr)
    batch_size = opts.batch_size or harness.default_batch_size(model, prepared, opts.device)
    results, computed, reused = [], 0, 0
    try:
        for k, indices in enumerate(shards):
            if k % world != rank:
                continue
            path = work_dir / f"shard{k:05d}.pt"
            result = load_tensors(path)
            if result is None:
                with autocast(opts.precision, opts.device):
                    result = harness.evaluate(model, dataset, prepared, indices, device=opts.device,
                                              batch_size=batch_size, workers=opts.workers, progress=progress)
                save_tensors(path, result)
                computed += 1
            else:
                reused += 1
                if progress is not None:
                    progress.update(len(indices))
            results.append(result)
    finally:
        if progress is not None:
            progress.close()
    if not results:  # more ranks than shards: an empty result of the right shape
        results = [harness.evaluate(model, dataset, prepared, [], device=opts.device, batch_size=batch_size)]
    merged = _gather_to_rank0(harness.merge(results), opts.device)
    if rank != 0:
        return None
    metrics, per_class = harness.finalize(dataset, merged, prepared)
    harness.check_metrics(metrics)
    wall = time.perf_counter() - start
    return {
        "schema": "silc-bench/result/v1",
        "created": now_iso(),
        "task": {"name": task["name"], "version": task["version"], "spec_sha256": sha256_json(
            {k: v for k, v in task.items() if not k.startswith("_")})},
        "metric": harness.metric,
        "model": model_info,
        "dataset": description,
        "protocol": protocol,
        "protocol_sha256": sha256_json(protocol),
        "details": details,
        "metrics": metrics,
        "per_class": per_class,
        "precision": describe_precision(opts.precision, opts.device, compiled=opts.compile),
        "environment": relativize(environment(opts.device), roots),
        "roots": {name: ROOT_MEANING[name] for name in roots},
        "timing": {"wall_seconds": wall, "images_per_second": n / wall if wall > 0 else None,
                   "batch_size": batch_size, "workers": opts.workers, "world_size": world,
                   "note": "timing covers this invocation only (reused shards take no time)" if reused else None},
        "_work": {"dir": str(work_dir), "shards": len(shards), "computed": computed, "reused": reused},
        **({"predictions": {"dir": prediction_dir.name, "format": prediction_format(dataset.num_classes),
                            "count": len(list(prediction_dir.glob("*.png"))),
                            "note": "one PNG of class ids per image, named as the image, beside the record"}}
           if prediction_dir is not None else {}),
    }


ROOT_MEANING = {
    "<data>": f"--data-root, else ${paths.DATA_ENV}, else ~/data",
    "<checkpoints>": f"--checkpoint-dir, else ${paths.CHECKPOINT_ENV}, else ~/.cache/silc_bench/checkpoints",
    "<out>": "--out",
    "<project>": "the silc-bench source folder",
    "<home>": "the user's home folder",
}


def run(task_name: str, model_specs: list[str], dataset_names: list[str] | None, opts: RunOptions) -> list[dict]:
    """Every (model, dataset) pair; pairs with a record already written are skipped unless `force`."""
    task = registry.task_spec(task_name)
    harness = get_harness(task)
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
        model = load_for_task(harness, model_spec, opts)
        if opts.compile:
            compile_model(model)
        for dataset_name in todo:
            path = output_path(task_name, model_spec, dataset_name, opts)
            if opts.force:
                for old in (path.parent / "shards").glob(f"{dataset_name}-*"):
                    shutil.rmtree(old, ignore_errors=True)
            record = evaluate_one(task, model, model_spec, dataset_name, opts, harness)
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
        read_record(path, fix="none needed: this run recomputes it and replaces the file")
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
