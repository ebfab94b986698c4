"""Training recipes (pretraining, CAT-Seg): YAML files of plain data merged over the trainer's
defaults (pretrain/settings.py, catseg/train.py DEFAULTS), and the command-line wrapper both
trainers share."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from silc_bench.errors import UserError


def read_recipe(path, what: str) -> dict:
    """A recipe file as a mapping; a missing, unreadable or non-mapping file is a UserError."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the {what} config ({e})", path=path, fix="pass a readable YAML file")
    if not isinstance(raw, dict):
        raise UserError(f"a {what} config must be a YAML mapping", path=path)
    return raw


def merge_settings(base: dict, over: dict, path, *, what: str, defaults_at: str, open_sections=(),
                   replaced_sections=(), where: str = "", strict: bool = True) -> dict:
    """`over` on top of `base`. Unknown keys are errors (a typo must not be silently ignored),
    except inside `open_sections` (free-form, checked by whatever consumes them); sections in
    `replaced_sections` are taken whole rather than merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if strict and k not in base:
            raise UserError(f"unknown {what} setting {where}{k!r}", path=path,
                            fix=f"use one of {sorted(base)} (defaults: {defaults_at})")
        mergeable = isinstance(out.get(k), dict) and isinstance(v, dict) and k not in replaced_sections
        if mergeable and (out[k] or not strict):
            out[k] = merge_settings(out[k], v, path, what=what, defaults_at=defaults_at, where=f"{where}{k}.",
                                    strict=strict and k not in open_sections)
        else:
            out[k] = v
    return out


def run_main(main) -> None:
    """`python -m ...` entry of a trainer: bad input ends in one message and exit code 2."""
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
