"""The task interface: what every harness offers the runner, and what the runner promises it.

Contract
--------
A harness is built from its whole task spec (`tasks/<name>.yaml`, keys below) and owns everything
task-specific; the runner names no task and no model kind.

- `model_loader` (class attribute): the name of a loader in `silc_bench.checkpoints.MODEL_LOADERS`
  that turns `--model SPEC` into what `setup` and `evaluate` expect ("vlm": any
  `VisionLanguageModel`; "catseg": a trained CAT-Seg).
- `open_dataset(name, data_root, limit)` -> an indexable dataset (`len()`; the runner cuts
  `range(len(dataset))` into shards). Its `describe()` (optional) goes into the record.
- `setup(model, dataset, protocol, device, cache)` -> a prepared object with a `details` dict
  (recorded, and part of the resume key): work done once per (model, dataset), e.g. class text
  embeddings.
- `evaluate(model, dataset, prepared, indices, *, device, batch_size, workers, progress)` -> one
  **shard result**: `{"sums": {name: tensor}, "examples": {"index": LongTensor[n], field: tensor
  [n, ...] or list of n items}}`, either part optional. Sums are added across shards and ranks
  (exact for integer counts); examples are concatenated and put in index order, for corpus-level
  metrics (AP, CIDEr, retrieval, few-shot) that need every prediction. A shard result must depend
  only on `indices` (never on which other shards ran, the batch size or the rank): that is what
  makes resumed, re-batched and multi-process runs give the identical record.
- `saves_predictions` (class attribute, default False): the harness writes each image's prediction
  to `prepared.prediction_dir` when the runner sets it (`--save-predictions`; zs-seg, ov-seg).
- `default_batch_size(model, prepared, device)` -> examples (or crops) per forward when the user
  gives no `--batch-size` (default 16; zs-seg sizes it by tokens on a CPU). Never changes a number.
- `merge(results)` -> one result of the same form (the default above; override only for another
  associative rule).
- `finalize(dataset, merged, prepared)` -> `(metrics, per_class)`: `metrics` must hold the spec's
  `metric.primary` and every key of `metric.report` (checked by `check_metrics`).

Spec keys read here: `name`, `version`, `harness`, `datasets`, `protocol`, `metric: {primary,
higher_is_better, report}`, `paper`, and any task-specific key the harness documents (e.g.
ov-seg's `dataset_entries`).
"""
from __future__ import annotations

import abc

import torch

from silc_bench.errors import UserError

SUMS, EXAMPLES, INDEX = "sums", "examples", "index"


def _concat(parts: list):
    if torch.is_tensor(parts[0]):
        return torch.cat(parts)
    return [item for part in parts for item in part]


def _take(values, order: torch.Tensor):
    if torch.is_tensor(values):
        return values[order]
    return [values[i] for i in order.tolist()]


def merge_results(results: list[dict]) -> dict:
    """Sums added; examples concatenated, then sorted by `index` (duplicates are an error)."""
    results = [r for r in results if r]
    out: dict = {}
    sums = [r[SUMS] for r in results if r.get(SUMS)]
    if sums:
        out[SUMS] = {k: v.clone() for k, v in sums[0].items()}
        for s in sums[1:]:
            if set(s) != set(out[SUMS]):
                raise RuntimeError(f"shard results disagree on their sums: {sorted(s)} vs {sorted(out[SUMS])}")
            for k in out[SUMS]:
                out[SUMS][k] += s[k]
    examples = [r[EXAMPLES] for r in results if r.get(EXAMPLES) and len(r[EXAMPLES][INDEX])]
    if examples:
        fields = set(examples[0])
        if any(set(e) != fields for e in examples):
            raise RuntimeError("shard results disagree on their example fields")
        joined = {k: _concat([e[k] for e in examples]) for k in fields}
        index = torch.as_tensor(joined[INDEX], dtype=torch.long)
        order = torch.argsort(index, stable=True)
        if len(index) > 1 and bool((index[order][1:] == index[order][:-1]).any()):
            raise RuntimeError("an example was evaluated twice (overlapping shards)")
        out[EXAMPLES] = {k: _take(v, order) for k, v in joined.items()}
        out[EXAMPLES][INDEX] = index[order]
    return out


def open_first(names: list[str], open_one):
    """The dataset of the first of `names` that `open_one(name)` opens (a task spec's
    `dataset_entries` list several on-disk layouts for one column); else the first one's error."""
    errors = []
    for name in names:
        try:
            return open_one(name)
        except UserError as e:
            errors.append(e)
    raise errors[0]


def metric_block(task: dict) -> dict:
    """The spec's `metric:` block, checked: {primary, higher_is_better, report}."""
    block = task.get("metric") or {}
    where = task.get("_path")
    if not isinstance(block, dict) or "primary" not in block:
        raise UserError(f"task {task.get('name')!r} has no `metric: {{primary: ...}}` block", path=where,
                        fix="add metric: {primary: NAME, higher_is_better: true, report: [NAME, ...]}")
    report = list(block.get("report") or [block["primary"]])
    if block["primary"] not in report:
        report.insert(0, block["primary"])
    hib = block.get("higher_is_better", True)
    if not isinstance(hib, (bool, dict)):
        raise UserError(f"task {task.get('name')!r}: metric.higher_is_better must be true/false or a mapping "
                        "metric -> true/false", path=where, fix="write higher_is_better: true")
    return {"primary": block["primary"], "higher_is_better": hib, "report": report}


def higher_is_better(block: dict, metric: str) -> bool:
    """Direction of one metric under a `metric_block` (a mapping may name metrics one by one)."""
    hib = block.get("higher_is_better", True)
    if isinstance(hib, dict):
        base = metric.split(".")[0]
        return bool(hib.get(metric, hib.get(base, hib.get("default", True))))
    return bool(hib)


class Harness(abc.ABC):
    """One task's evaluation (see the module docstring for the contract)."""

    model_loader: str = "vlm"

    def __init__(self, task: dict):
        self.task = task
        self.metric = metric_block(task)

    # ---- data --------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_dataset(self, name: str, data_root, limit: int | None = None):
        ...

    def protocol_for(self, dataset, overrides: dict | None) -> dict:
        """Task protocol, then the dataset's own overrides for this task (e.g. toy-world image
        sizes), then the user's."""
        protocol = dict(self.task.get("protocol") or {})
        spec = getattr(dataset, "spec", None) or {}
        protocol.update(((spec.get("protocol") or {}).get(self.task["name"])) or {})
        protocol.update(overrides or {})
        return protocol

    # ---- evaluation ----------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, model, dataset, protocol: dict, device, cache=None):
        ...

    @abc.abstractmethod
    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size: int = 16, workers: int = 0,
                 progress=None) -> dict:
        ...

    def default_batch_size(self, model, prepared, device) -> int:
        return 16

    def merge(self, results: list[dict]) -> dict:
        return merge_results(results)

    @abc.abstractmethod
    def finalize(self, dataset, merged: dict, prepared) -> tuple[dict, dict]:
        ...

    def check_metrics(self, metrics: dict) -> dict:
        missing = [k for k in self.metric["report"] if k not in metrics]
        if missing:
            raise RuntimeError(f"harness {self.task['harness']!r} did not return the metrics {missing} that "
                               f"tasks/{self.task['name']}.yaml reports")
        return metrics


class CountsHarness(Harness):
    """A harness built from a module's `setup`, `evaluate` (-> integer-count state) and
    `finalize(dataset, state)` functions: the state travels as the shard result's sums.
    Subclasses name the functions (`module_setup`, `module_evaluate`, `module_finalize`)."""

    module_setup = module_evaluate = module_finalize = None

    def setup(self, model, dataset, protocol, device, cache=None):
        return self.module_setup(model, dataset, protocol, device, cache=cache)

    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size=16, workers=0, progress=None):
        return {SUMS: self.module_evaluate(model, dataset, prepared, indices, device=device,
                                           batch_size=batch_size, workers=workers, progress=progress)}

    def finalize(self, dataset, merged, prepared):
        return self.module_finalize(dataset, merged[SUMS])
