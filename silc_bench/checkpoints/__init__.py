"""`load_model(spec)`: one entry point for every checkpoint format.

The format is chosen by the spec, never guessed from a file's content or name:
registry name -> its entry's `format`; `*.npz` -> big_vision; `open_clip:ARCH[:WEIGHTS]`; `hf:DIR`.
"""
from __future__ import annotations

import os
from pathlib import Path

from silc_bench import paths, registry
from silc_bench.errors import UserError


def parse_tokenizer_flag(flag: str | None) -> dict | None:
    """`--tokenizer sentencepiece:FILE` -> tokenizer dict (big_vision conventions)."""
    if not flag:
        return None
    kind, _, file = flag.partition(":")
    if kind != "sentencepiece" or not file:
        raise UserError(f"cannot read --tokenizer {flag!r}", fix="write --tokenizer sentencepiece:/path/to/model.spm")
    return {"kind": "sentencepiece", "file": file, "context_length": None, "pad_id": 1, "lowercase": True, "eos": "sticky"}


def _resolve_file(entry: dict, checkpoint_dir) -> Path:
    """`bundled:` files ship with the project (toy checkpoints); others live in the checkpoint dir."""
    if "bundled" in entry:
        path = paths.PROJECT_DIR / entry["bundled"]
        if not path.exists():
            raise UserError(f"bundled checkpoint for model {entry['name']!r} is missing", path=path,
                            fix=f"restore it from git, or re-create it: {entry.get('release', '')}")
        return path
    base = paths.checkpoint_dir(checkpoint_dir)
    path = Path(entry["file"])
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise UserError(
            f"checkpoint for model {entry['name']!r} not found",
            path=path,
            fix=(
                f"put the file there, or point --checkpoint-dir (or ${paths.CHECKPOINT_ENV}) at the folder holding "
                f"{entry['file']!r}. Public release: {entry.get('release', 'unknown')}"
            ),
        )
    return path


def _registry_tokenizer(entry: dict, path: Path) -> dict | None:
    tok = entry.get("tokenizer")
    if tok is None:
        return None
    tok = dict(tok)
    file = Path(tok["file"])
    if not file.is_absolute():
        file = path.parent / file
    if not file.exists():
        raise UserError(
            f"tokenizer for model {entry['name']!r} not found",
            path=file,
            fix=f"put the sentencepiece model next to the checkpoint. Public release: {entry.get('release', 'unknown')}",
        )
    tok["file"] = str(file)
    return tok


def load_model(spec: str, *, checkpoint_dir=None, tokenizer: str | dict | None = None, device="cpu", **options):
    """Return a `VisionLanguageModel` for `spec`; `provenance["spec"]` records how it was named."""
    if isinstance(tokenizer, str):
        tokenizer = parse_tokenizer_flag(tokenizer)
    spec = str(spec)
    if spec.startswith("open_clip:"):
        from silc_bench.checkpoints.open_clip import load_open_clip

        arch, _, weights = spec[len("open_clip:"):].partition(":")
        if arch in ("local-dir", "hf-hub"):  # open_clip's own schemes: the whole rest is the arch
            arch, weights = f"{arch}:{weights}", ""
        model = load_open_clip(arch, weights or None, device=device)
    elif spec.startswith("hf:"):
        from silc_bench.checkpoints.hf import load_hf

        model = load_hf(spec[len("hf:"):], device=device)
    elif spec.endswith(".npz") or os.sep in spec:
        from silc_bench.checkpoints.big_vision import load_big_vision

        if not spec.endswith(".npz"):
            raise UserError("a checkpoint path must be a big_vision .npz file", path=spec,
                            fix="pass a .npz, open_clip:ARCH:FILE, hf:DIR or a registry name (silc-bench ls models)")
        model = load_big_vision(spec, tokenizer=tokenizer, device=device, **options)
    else:
        entry = registry.model_entry(spec)
        fmt = entry["format"]
        path = _resolve_file(entry, checkpoint_dir)
        if fmt == "big_vision":
            from silc_bench.checkpoints.big_vision import load_big_vision

            model = load_big_vision(path, tokenizer=tokenizer or _registry_tokenizer(entry, path), device=device, **options)
        elif fmt == "open_clip":
            from silc_bench.checkpoints.open_clip import load_open_clip

            model = load_open_clip(entry["arch"], str(path), device=device)
        elif fmt == "hf":
            from silc_bench.checkpoints.hf import load_hf

            model = load_hf(path, device=device)
        else:
            raise UserError(f"model {spec!r} has unknown format {fmt!r}", path=paths.CONFIGS_DIR / "models.yaml",
                            fix="format must be big_vision, open_clip or hf")
        model.provenance["registry_name"] = spec
        if entry.get("paper_row"):
            model.provenance["paper_row"] = entry["paper_row"]
    model.provenance["spec"] = spec
    return model.eval()


# What `--model SPEC` can name, by loader: a harness asks for one by name (`Harness.model_loader`).
# Values are "module:function" (imported on first use) or callables (tests may put a stub here).
MODEL_LOADERS = {
    "vlm": "silc_bench.checkpoints:load_model",
    "catseg": "silc_bench.checkpoints.catseg:load_catseg_model",
    "owl": "silc_bench.checkpoints.owl:load_owl",
    "litdec": "silc_bench.checkpoints.litdec:load_litdec",
}


def load_head_weights(module, state: dict) -> tuple[list[str], list[str]]:
    """Load a trained head's `state` into `module`, whose `backbone.` weights come from their own
    checkpoint (a state may also carry fine-tuned backbone weights); -> (missing head weights,
    unexpected keys), both empty when the files fit."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    return [k for k in missing if not k.startswith("backbone.")], list(unexpected)


def get_loader(name: str):
    """The loader registered as `name` in MODEL_LOADERS."""
    import importlib

    if name not in MODEL_LOADERS:
        raise UserError(f"unknown model loader {name!r}", fix=f"use one of: {', '.join(sorted(MODEL_LOADERS))}")
    loader = MODEL_LOADERS[name]
    if isinstance(loader, str):
        module, _, func = loader.partition(":")
        loader = getattr(importlib.import_module(module), func)
    return loader
