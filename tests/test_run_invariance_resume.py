"""Numbers that do not depend on batch size, workers or process count; runs that survive SIGKILL."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.results.record import read_record

PROTOCOL = ["--protocol", "short_side=64", "--protocol", "crop=32", "--protocol", "stride=16"]
SAME_KEYS = ("metrics", "per_class", "protocol", "protocol_sha256", "model", "dataset", "details", "task")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_segmentation_fixture("ade150", root, num_images=8, size=(48, 64), seed=5)
    return root


# torchrun gives each process one intra-op thread (OMP_NUM_THREADS=1). More threads sum floats in
# another order, which can flip near-tied pixels of a random-weight model, so every run here uses
# one thread: what varies is batch size, workers, shards and process count.
def cli(*args, **kw):
    cmd = [sys.executable, "-m", "silc_bench.cli", "run", "zs-seg", "--datasets", "ade150", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def only_record(out: Path) -> dict:
    (path,) = [p for p in Path(out).rglob("ade150.json") if "shards" not in p.parts]
    return read_record(path)


def same(a: dict, b: dict):
    for key in SAME_KEYS:
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(tiny_big_vision_npz, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    done = cli("--model", str(tiny_big_vision_npz), "--data-root", str(data_root), "--out", str(out),
               "--workers", "0", "--batch-size", "16", *PROTOCOL)
    assert done.returncode == 0, done.stderr
    return only_record(out)


@pytest.mark.parametrize("batch_size,workers", [(1, 0), (7, 2)])
def test_batch_size_and_workers_do_not_change_numbers(reference, tiny_big_vision_npz, data_root, tmp_path, batch_size, workers):
    done = cli("--model", str(tiny_big_vision_npz), "--data-root", str(data_root), "--out", str(tmp_path),
               "--workers", str(workers), "--batch-size", str(batch_size), "--shard-size", "3", *PROTOCOL)
    assert done.returncode == 0, done.stderr
    same(only_record(tmp_path), reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(reference, tiny_big_vision_npz, data_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "silc_bench.cli", "run", "zs-seg", "--datasets", "ade150",
           "--no-progress", "--model", str(tiny_big_vision_npz), "--data-root", str(data_root), "--out", str(tmp_path),
           "--workers", "0", "--shard-size", "2", "--device", "cpu", *PROTOCOL]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    record = only_record(tmp_path)
    assert record["timing"]["world_size"] == 2
    same(record, reference)


def shard_files(out: Path) -> list[Path]:
    """Finished shards: the state file and its checksum are both in place."""
    return [p for p in Path(out).rglob("shard*.pt") if Path(f"{p}.sha256").exists()]


def test_sigkill_halfway_then_resume_recomputes_only_unfinished_shards(reference, tiny_big_vision_npz, data_root, tmp_path):
    def args(out):
        return ["--model", str(tiny_big_vision_npz), "--data-root", str(data_root), "--out", str(out), "--workers", "0",
                "--shard-size", "1", "--protocol", "short_side=160", "--protocol", "crop=32", "--protocol", "stride=16"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "silc_bench.cli", "run", "zs-seg", "--datasets", "ade150",
                             "--no-progress", *args(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while len(shard_files(killed)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(shard_files(killed))
    assert 3 <= finished < 8, "the run must be killed halfway"
    assert not [p for p in killed.rglob("*.json") if "shards" not in p.parts], "no record from a killed run"

    # A damaged shard is recomputed, not used.
    damaged = shard_files(killed)[0]
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    done = cli(*args(killed))
    assert done.returncode == 0, done.stderr
    assert "fails its checksum" in done.stderr
    computed, reused = map(int, re.search(r"shards computed (\d+), reused (\d+)", done.stderr).groups())
    assert (computed, reused) == (8 - finished + 1, finished - 1)
    assert not shard_files(killed), "shards are removed once the record is written"
    uninterrupted = tmp_path / "uninterrupted"
    assert cli(*args(uninterrupted)).returncode == 0
    same(only_record(killed), only_record(uninterrupted))


def test_corrupted_cache_is_detected_and_recomputed(reference, tiny_big_vision_npz, data_root, tmp_path):
    args = ["--model", str(tiny_big_vision_npz), "--data-root", str(data_root), "--out", str(tmp_path), "--workers", "0",
            *PROTOCOL]
    assert cli(*args).returncode == 0
    (cached,) = (tmp_path / "cache").rglob("*.pt")
    cached.write_bytes(b"\x00" * 64)
    done = cli(*args, "--force")
    assert done.returncode == 0, done.stderr
    assert "fails its checksum" in done.stderr
    same(only_record(tmp_path), reference)
    again = cli(*args, "--force")  # the recomputed cache entry is valid and used
    assert "checksum" not in again.stderr
    same(only_record(tmp_path), reference)
