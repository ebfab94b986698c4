"""Files a run leaves behind to save work: caches (reused across runs) and shard states (resume).

Both are tensor dicts written atomically with a sha256 beside them, loaded with
`torch.load(weights_only=True)`; a file that fails its checksum or does not load is recomputed,
never used.
"""
from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import torch

from silc_bench.hashing import sha256_json
from silc_bench.results.record import atomic_write_bytes


def save_tensors(path: str | Path, tensors: dict) -> None:
    """Write `tensors` to `path` and its checksum to `path.sha256`, each atomically.

    The checksum is written last, so a file without a matching checksum is incomplete.
    """
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in tensors.items()}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    atomic_write_bytes(f"{path}.sha256", hashlib.sha256(data).hexdigest().encode())


def load_tensors(path: str | Path) -> dict | None:
    """The saved dict, or None when missing, incomplete or corrupt (with a note on stderr)."""
    path = Path(path)
    check = Path(f"{path}.sha256")
    if not path.exists() or not check.exists():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != check.read_text().strip():
        print(f"silc-bench: {path} fails its checksum; recomputing it", file=sys.stderr)
        return None
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
        print(f"silc-bench: {path} does not load ({e}); recomputing it", file=sys.stderr)
        return None


class Cache:
    """Content-addressed cache: the key is a dict of everything that changes the value."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, kind: str, key: dict, compute) -> torch.Tensor:
        if self.root is None or key is None:
            return compute()
        path = self.root / kind / f"{sha256_json(key)}.pt"
        saved = load_tensors(path)
        if saved is not None and saved.get("key_sha256") == sha256_json(key):
            self.hits += 1
            return saved["value"]
        self.misses += 1
        value = compute()
        save_tensors(path, {"value": value, "key_sha256": sha256_json(key)})
        return value
