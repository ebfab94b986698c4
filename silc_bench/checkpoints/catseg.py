"""The trained CAT-Seg checkpoint format: a folder holding `catseg.json` and `catseg.safetensors`.

catseg.safetensors: the trained tensors by parameter name (the head and the fine-tuned backbone
  projections), metadata {"format": "silc-bench-catseg"};
catseg.json: format and version, the weights file and its sha256, the backbone (spec as
  `load_model` takes it, sha256, describe()), the CatSegConfig, the model's describe() and the
  training settings.

Loading rebuilds the backbone with `load_model(spec)` (its sha256 must match the recorded one),
builds CatSeg from the config and loads exactly the trained tensors. Nothing is unpickled: JSON and
safetensors only. `load_catseg_model` is the `ov-seg` task's model loader (run folder, catseg.json
or a registry entry with `format: catseg`).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from silc_bench.errors import UserError

FORMAT = "silc-bench-catseg"
FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "catseg.safetensors", "catseg.json"


def portable_spec(spec: str) -> str:
    """The backbone spec to record: a relative .npz path becomes absolute, so that the checkpoint
    loads from any working directory."""
    p = Path(str(spec))
    return str(p.resolve()) if str(spec).endswith(".npz") and p.exists() else str(spec)


def save_catseg(model, out_dir, *, spec: str, backbone_sha256: str | None, train: dict | None = None) -> Path:
    """Write catseg.safetensors and catseg.json (both atomically) into `out_dir`; -> the json."""
    from safetensors.torch import save

    from silc_bench.hashing import sha256_file
    from silc_bench.results.record import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in model.trainable_state().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_file(out / WEIGHTS_FILE),
            "backbone": {"spec": spec, "sha256": backbone_sha256, "describe": _jsonable(model.backbone.describe())},
            "config": asdict(model.config), "catseg": _jsonable(model.describe()), "train": _jsonable(train or {})}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    return out / META_FILE


def meta_path(path) -> Path:
    """The catseg.json of a run folder, of a catseg.json or of a catseg.safetensors path."""
    p = Path(path)
    return p / META_FILE if p.is_dir() else (p if p.suffix == ".json" else p.with_name(META_FILE))


def read_meta(path) -> dict:
    where = meta_path(path)
    try:
        meta = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the CAT-Seg description ({e})", path=where,
                        fix=f"pass the folder written by `silc-bench train cat-seg` (holding {META_FILE})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{where.name} is not a CAT-Seg checkpoint description", path=where,
                        fix=f"pass the {META_FILE} written by `silc-bench train cat-seg`")
    return meta


def load_catseg(path, *, checkpoint_dir=None, device="cpu"):
    """A trained CAT-Seg in eval mode: the backbone via `load_model(spec)`, then the trained tensors.
    `path`: the run folder, its catseg.json or its catseg.safetensors."""
    from safetensors.torch import load_file

    from silc_bench.catseg.model import CatSeg, CatSegConfig
    from silc_bench.checkpoints import load_model

    where = meta_path(path)
    meta = read_meta(where)
    backbone = load_model(meta["backbone"]["spec"], checkpoint_dir=checkpoint_dir, device=device)
    want, got = meta["backbone"].get("sha256"), backbone.provenance.get("sha256")
    if want and got and want != got:
        raise UserError(f"backbone {meta['backbone']['spec']!r} has sha256 {got[:12]}..., CAT-Seg was trained on "
                        f"{want[:12]}...", path=where, fix="point the spec / --checkpoint-dir at the original backbone")
    model = CatSeg(backbone, CatSegConfig.from_dict(meta["config"]))
    weights = where.with_name(meta.get("weights", WEIGHTS_FILE))
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:
        raise UserError(f"cannot read the CAT-Seg weights ({e})", path=weights,
                        fix=f"re-export them, or restore the file written next to {META_FILE}") from e
    model.load_trainable_state(state, source=weights)
    return model.eval()


def load_catseg_model(spec: str, *, checkpoint_dir=None, device="cpu"):
    """A trained CAT-Seg (the `ov-seg` task's model): a run folder, its catseg.json, or a registry
    entry with `format: catseg`. Its provenance names the head's weights and the backbone."""
    from silc_bench import registry
    from silc_bench.checkpoints import _resolve_file
    from silc_bench.hashing import sha256_file

    entry = None
    path = Path(spec)
    if not path.exists() and spec in registry.models():
        entry = registry.model_entry(spec)
        if entry["format"] != "catseg":
            raise UserError(f"model {spec!r} is a {entry['format']} backbone, not a trained CAT-Seg",
                            fix="train one with `silc-bench train cat-seg --model SPEC` and pass its output folder")
        path = _resolve_file(entry, checkpoint_dir)
    if not path.exists():
        raise UserError("CAT-Seg checkpoint not found", path=path,
                        fix=f"pass the folder written by `silc-bench train cat-seg` (holding {META_FILE})")
    model = load_catseg(path, checkpoint_dir=checkpoint_dir, device=device)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_FILE
    model.provenance = {"spec": spec, "format": "catseg", "path": str(folder),
                        "sha256": sha256_file(weights) if weights.exists() else None}
    if entry is not None:
        model.provenance["registry_name"] = spec
        if entry.get("paper_row"):
            model.provenance["paper_row"] = entry["paper_row"]
    return model.eval()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
