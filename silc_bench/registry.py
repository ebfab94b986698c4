"""Names -> specs, read from the data files in configs/ and tasks/ (registration is data, in one place)."""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from silc_bench.errors import UserError
from silc_bench.paths import CONFIGS_DIR, TASKS_DIR


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError("registry file is missing", path=path, fix="run from a source checkout (pip install -e .) or set $SILC_BENCH_HOME")
    except yaml.YAMLError as e:
        raise UserError(f"registry file is not valid YAML: {e}", path=path, fix="correct the YAML syntax")
    if not isinstance(data, dict):
        raise UserError("registry file must hold a mapping", path=path, fix="write `name: {...}` entries")
    return data


@functools.cache
def models() -> dict:
    return _read_yaml(CONFIGS_DIR / "models.yaml")


@functools.cache
def datasets() -> dict:
    return _read_yaml(CONFIGS_DIR / "datasets.yaml")


@functools.cache
def tasks() -> dict:
    """Every tasks/*.yaml, keyed by its `name`."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        spec = _read_yaml(path)
        spec["_path"] = str(path)
        out[spec["name"]] = spec
    return out


def _lookup(kind: str, table: dict, name: str) -> dict:
    if name not in table:
        known = ", ".join(sorted(table))
        raise UserError(f"unknown {kind} {name!r}", fix=f"use one of: {known} (see `silc-bench ls {kind}s`)")
    return dict(table[name], name=name)


def model_entry(name: str) -> dict:
    return _lookup("model", models(), name)


def dataset_entry(name: str) -> dict:
    return _lookup("dataset", datasets(), name)


def task_spec(name: str) -> dict:
    return _lookup("task", tasks(), name)
