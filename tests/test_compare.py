"""Leaderboard export and the `silc-bench compare` regression gate, on fixture records."""
import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest

from silc_bench.errors import UserError
from silc_bench.results import compare, leaderboard

RECORDS = Path(__file__).parent / "fixtures" / "records"
MODELS = {"silc-c-b16", "siglip-b16-256", "siglip-b16-256 (limited)"}
SUBMETRICS = {"mIoU", "aAcc", "mAcc", "mIoU_present.mIoU", "mIoU_present.fwIoU", "mIoU_present.mACC", "mIoU_present.pACC"}


def call(module, *argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args(list(argv)))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def baseline(tmp_path, capsys):
    path = tmp_path / "baseline.csv"
    assert call(compare, "--records", str(RECORDS), "--write-baseline", str(path)) == 0
    assert "wrote baseline" in capsys.readouterr().out
    return path


def edit(path, model, dataset, metric, **changes):
    rows = read_csv(path)
    hits = [r for r in rows if (r["model"], r["dataset"], r["metric"]) == (model, dataset, metric)]
    assert len(hits) == 1
    hits[0].update({k: str(v) for k, v in changes.items()})
    write_csv(path, rows)


# ---------------------------------------------------------------- leaderboard

def test_leaderboard_one_row_per_model_task_dataset_metric_with_provenance(tmp_path, capsys):
    out = tmp_path / "lb.csv"
    assert call(leaderboard, "--records", str(RECORDS), "--out", str(out)) == 0
    assert "wrote" in capsys.readouterr().out
    rows = read_csv(out)
    keys = [(r["model"], r["task"], r["dataset"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == 5 * len(SUBMETRICS)  # 5 (model, dataset) cells; the archived duplicate is older
    assert keys == sorted(keys)
    assert {r["model"] for r in rows} == MODELS
    assert {r["metric"] for r in rows} == SUBMETRICS  # per-class lists are not rows
    for r in rows:
        for column in ("model_spec", "checkpoint_sha256", "tokenizer_kind", "tokenizer_sha256", "task", "task_version",
                       "dataset", "limited", "metric", "value", "protocol_sha256", "git_commit", "git_dirty",
                       "silc_bench_version", "torch_version", "device", "created"):
            assert r[column] != "", (column, r)
        assert len(r["checkpoint_sha256"]) == len(r["tokenizer_sha256"]) == len(r["protocol_sha256"]) == 64
        assert len(r["git_commit"]) == 40
    silc = next(r for r in rows if (r["model"], r["dataset"], r["metric"]) == ("silc-c-b16", "ade150", "mIoU"))
    assert float(silc["value"]) == 19.2534  # full precision, from the newest record
    assert silc["created"] == "2024-06-02T09:00:00+00:00" and silc["git_commit"].startswith("3f2a9c1d")
    assert (silc["tokenizer_kind"], silc["task_version"], silc["limited"], silc["device"]) == ("sentencepiece", "1", "false", "cuda")
    limited = next(r for r in rows if r["model"] == "siglip-b16-256 (limited)" and r["metric"] == "mIoU")
    assert (limited["limited"], limited["limit"], limited["model_spec"], limited["git_dirty"]) == ("true", "8", "siglip-b16-256", "true")


def test_leaderboard_handles_open_clip_tokenizers_and_unregistered_specs(tmp_path, capsys):
    record = json.loads((RECORDS / "zs-seg/silc-c-b16/pc59.json").read_text())
    record["model"] = {"format": "open_clip", "arch": "ViT-B-16", "weights": "/ckpt/ViT-B-16.pt", "sha256": "ab" * 32,
                       "spec": "open_clip:ViT-B-16:/ckpt/ViT-B-16.pt",
                       "tokenizer": {"kind": "open_clip", "arch": "ViT-B-16", "vocab_sha256": "cd" * 32}}
    (tmp_path / "r.json").write_text(json.dumps(record))
    call(leaderboard, "--records", str(tmp_path), "--out", str(tmp_path / "lb.csv"))
    row = next(r for r in read_csv(tmp_path / "lb.csv") if r["metric"] == "mIoU")
    assert (row["model"], row["checkpoint_sha256"], row["tokenizer_kind"], row["tokenizer_sha256"]) == \
        ("open_clip:ViT-B-16:/ckpt/ViT-B-16.pt", "ab" * 32, "open_clip", "cd" * 32)


def test_leaderboard_is_deterministic(tmp_path, capsys):
    call(leaderboard, "--records", str(RECORDS), "--out", str(tmp_path / "a.csv"))
    call(leaderboard, "--records", str(RECORDS / "zs-seg"), "--records", str(RECORDS / "archive"), "--out", str(tmp_path / "b.csv"))
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


# ---------------------------------------------------------------- compare

def test_unchanged_records_pass(baseline, capsys):
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline)) == 0
    assert capsys.readouterr().out == f"compare: {5 * len(SUBMETRICS)} metrics within tolerance\n"


def test_moved_metric_fails_and_prints_the_row(baseline, capsys):
    edit(baseline, "silc-c-b16", "ade150", "mIoU", value=20.5)  # current 19.2534: moved by -1.2466
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline)) == 1
    out = capsys.readouterr().out
    assert "1 of 35 metrics failed" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("WORSE"))
    assert line.split()[:9] == ["WORSE", "silc-c-b16", "zs-seg", "ade150", "mIoU", "20.500", "19.253", "-1.247", "0.500"]


def test_move_within_tolerance_passes(baseline, capsys):
    edit(baseline, "silc-c-b16", "ade150", "mIoU", value=19.6)
    edit(baseline, "siglip-b16-256", "pc59", "mIoU", value=22.24)  # exactly 0.5 away: within
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline)) == 0
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline), "--tolerance", "0.2") == 1
    assert "WORSE" in capsys.readouterr().out


def test_direction_follows_higher_is_better(baseline, capsys):
    edit(baseline, "silc-c-b16", "ade150", "mIoU", value=18.0)  # current 19.25 is higher: better, not worse
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline)) == 1
    assert any(line.strip().startswith("BETTER") for line in capsys.readouterr().out.splitlines())
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline), "--allow-better") == 0
    edit(baseline, "silc-c-b16", "ade150", "mIoU", value=20.5)  # worse still fails with --allow-better
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline), "--allow-better") == 1


def test_a_lower_is_better_metric_is_worse_when_it_rises():
    from silc_bench.results.compare import Check

    up = Check(("m", "t", "d", "loss"), 1.0, 2.0, 0.1, "line 2", higher_is_better=False, allow_better=True)
    down = Check(("m", "t", "d", "loss"), 1.0, 0.5, 0.1, "line 2", higher_is_better=False, allow_better=True)
    assert (up.status, down.status) == ("WORSE", "ok")


def test_missing_record_fails_clearly(baseline, tmp_path, capsys):
    current = tmp_path / "current"
    shutil.copytree(RECORDS, current)
    (current / "zs-seg/siglip-b16-256/pc59.json").unlink()
    assert call(compare, "--records", str(current), "--baseline", str(baseline), "--metric", "mIoU") == 1
    out = capsys.readouterr().out
    assert "1 of 5 metrics failed" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("MISSING"))
    assert "siglip-b16-256" in line and "pc59" in line and "(no record)" in line


def test_per_row_tolerance_overrides_the_global_one(baseline, capsys):
    edit(baseline, "silc-c-b16", "pc59", "mIoU", value=33.0, tolerance=2)  # moved 1.42: fine for this row
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline)) == 0
    edit(baseline, "silc-c-b16", "pc59", "mIoU", value=31.6, tolerance=0.001)  # moved 0.018: too much for this row
    assert call(compare, "--records", str(RECORDS), "--baseline", str(baseline), "--tolerance", "5") == 1
    out = capsys.readouterr().out
    assert "0.001" in out and "pc59" in out


def test_json_baseline_and_metric_filter(tmp_path, capsys):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps([
        {"model": "silc-c-b16", "task": "zs-seg", "dataset": "ade150", "metric": "mIoU", "value": 19.0},
        {"model": "silc-c-b16", "task": "zs-seg", "dataset": "pc59", "metric": "mIoU", "value": 30.0, "tolerance": 2.0},
        {"model": "silc-c-b16", "task": "zs-seg", "dataset": "pc59", "metric": "aAcc", "value": 0.0},
    ]))
    assert call(compare, "--records", str(RECORDS), "--baseline", str(path), "--metric", "mIoU") == 0
    assert capsys.readouterr().out == "compare: 2 metrics within tolerance\n"
    assert call(compare, "--records", str(RECORDS), "--baseline", str(path)) == 1
    assert "aAcc" in capsys.readouterr().out


def test_write_baseline_json_round_trips(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert call(compare, "--records", str(RECORDS), "--write-baseline", str(path), "--metric", "mIoU") == 0
    assert len(json.loads(path.read_text())) == 5
    assert call(compare, "--records", str(RECORDS), "--baseline", str(path)) == 0


@pytest.mark.parametrize("text, message", [
    ("model,task,dataset\nx,y,z\n", "lacks the columns"),
    ("model,task,dataset,metric,value\nm,zs-seg,ade150,mIoU,high\n", "not a number"),
    ("model,task,dataset,metric,value,tolerance\nm,zs-seg,ade150,mIoU,1,-1\n", "negative"),
    ("model,task,dataset,metric,value\nm,zs-seg,ade150,mIoU,1\nm,zs-seg,ade150,mIoU,2\n", "also given"),
    ('{"model": "m"}', "list of objects"),
    ("[1, 2", "not valid JSON"),
])
def test_malformed_baseline_is_a_user_error(tmp_path, text, message):
    path = tmp_path / "baseline.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        call(compare, "--records", str(RECORDS), "--baseline", str(path))
    assert str(path) in str(info.value)


def test_empty_selection_is_a_user_error(baseline):
    with pytest.raises(UserError, match="no rows to check"):
        call(compare, "--records", str(RECORDS), "--baseline", str(baseline), "--metric", "nonexistent")
