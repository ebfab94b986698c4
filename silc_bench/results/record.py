"""Result records: one JSON file per (model, task, dataset), written whole or not at all.

A record says how its numbers were produced: checkpoint hash, tokenizer, prompts, protocol,
package versions and git commit.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from silc_bench.errors import UserError
from silc_bench.paths import PROJECT_DIR

SCHEMA = "silc-bench/result/v1"
REQUIRED_KEYS = ("schema", "task", "model", "dataset", "protocol", "metrics", "environment", "timing")
_PACKAGES = ("silc-bench", "torch", "torchvision", "open_clip_torch", "transformers", "numpy", "sentencepiece", "pillow")


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux /proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync and rename: readers never see half a file.

    The file gets the mode a plain `open()` would give it (0o666 & ~umask), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device) -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    device = str(device)
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor(),
        "git": git_state(),
    }


def slug(text: str) -> str:
    """A file-system-safe name for a model spec (paths and open_clip:/hf: specs included)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def record_path(out_dir: str | Path, task: str, model_name: str, dataset: str) -> Path:
    return Path(out_dir) / task / slug(model_name) / f"{dataset}.json"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_record(path: str | Path, record: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, allow_nan=True) + "\n")


class DamagedRecordError(UserError):
    """A result record that cannot be used. `problem` says what is wrong, without the fix text, so a
    caller that repairs it itself (the runner recomputes it) can word its own message."""

    def __init__(self, problem: str, *, path, fix: str | None):
        super().__init__(f"damaged result record {Path(path).name}: {problem}", path=path, fix=fix)
        self.problem = problem


def regenerate_fix(path: str | Path) -> str:
    """What a reader of records (report, export, compare) should tell the user to do about a damaged one."""
    parts = Path(path).parts
    task = parts[-3] if len(parts) >= 3 else "TASK"
    return (f"regenerate it: run the `silc-bench run {task} --model ... --datasets ...` command that wrote it "
            f"again with --force (or delete the file and run that command again)")


def read_record(path: str | Path, *, fix: str | None = None) -> dict:
    """Read and validate one record; a damaged one is a `DamagedRecordError` (a UserError) naming the file.

    `fix`: the advice in the error, for the caller's context; by default how to regenerate the
    record (right for `report` / `compare`). A caller that recomputes damaged records itself
    passes its own, e.g. `fix="none needed: it is recomputed now"`.
    """
    fix = regenerate_fix(path) if fix is None else fix
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedRecordError(f"unreadable ({type(e).__name__}: {e})", path=path, fix=fix) from e
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise DamagedRecordError(f"not a silc-bench result record (schema {SCHEMA!r} expected)", path=path, fix=fix)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise DamagedRecordError(f"incomplete: lacks {', '.join(missing)}", path=path, fix=fix)
    return record
