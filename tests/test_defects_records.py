"""Record defects: a damaged record's advice fits the reader's context; records get open()'s file mode."""
import json
import os
import stat

import pytest

from silc_bench.errors import UserError
from silc_bench.results.record import (SCHEMA, DamagedRecordError, atomic_write_bytes, atomic_write_text,
                                       read_record, write_record)


def _damaged(tmp_path, text):
    path = tmp_path / "runs" / "zs-seg" / "model" / "ade150.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", ['{"schema": "silc-bench/result/v1", "task"', '{"schema": "other"}',
                                  json.dumps({"schema": SCHEMA, "task": {}})])
def test_damaged_record_says_which_file_and_how_to_regenerate(tmp_path, text):
    path = _damaged(tmp_path, text)
    with pytest.raises(UserError) as e:
        read_record(path)
    msg = str(e.value)
    assert str(path) in msg and "damaged result record" in msg
    assert "silc-bench run zs-seg" in msg and "--force" in msg and "regenerate" in msg
    assert isinstance(e.value, DamagedRecordError) and e.value.problem and e.value.problem in msg


def test_damaged_record_fix_can_be_worded_by_the_caller(tmp_path):
    path = _damaged(tmp_path, "{not json")
    with pytest.raises(DamagedRecordError) as e:
        read_record(path, fix="none needed: it is recomputed now")
    msg = str(e.value)
    assert msg.splitlines()[-1].strip() == "fix: none needed: it is recomputed now"
    assert "delete" not in msg and "--force" not in msg


@pytest.fixture
def umask():
    def set_mask(mask):
        old = os.umask(mask)
        restore.append(old)

    restore = []
    yield set_mask
    for old in reversed(restore):
        os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_text(tmp_path / "b.txt", "x")
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: a normal open()
        f.write("x")
    for name in ("a.bin", "b.txt", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_records_and_exported_checkpoints_are_not_private(tmp_path, umask, tiny_config):
    from silc_bench.checkpoints.big_vision import save_big_vision
    from silc_bench.models.two_tower import TwoTower

    umask(0o022)
    record = {k: {} for k in ("task", "model", "dataset", "protocol", "metrics", "environment", "timing")}
    write_record(tmp_path / "r.json", {**record, "schema": SCHEMA})
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    path = save_big_vision(TwoTower.from_config(tiny_config(), seed=0), tmp_path / "m.npz",
                           tokenizer={"kind": "sentencepiece", "file": "x.model"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m.npz.json").stat().st_mode) == 0o644
