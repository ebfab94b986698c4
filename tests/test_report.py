"""`silc-bench report`: fixture records -> the paper's tables, checked against a hand-written table."""
import argparse
import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from silc_bench.errors import UserError
from silc_bench.paths import PAPER_DIR
from silc_bench.results import report

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = FIXTURES / "records"


def run_report(capsys, *argv):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    code = report.main(parser.parse_args(["--records", str(RECORDS), *argv]))
    out, err = capsys.readouterr()
    assert code == 0
    return out, err


def parse_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def latex_rows(text):
    """Body rows of a tabular as lists of cells."""
    body = text.split(r"\begin{tabular}")[1].split(r"\end{tabular}")[0]
    return [[c.strip() for c in line[: -len(r"\\")].split(" & ")]
            for line in body.splitlines() if line.endswith(r"\\")]


def test_table2_markdown_matches_hand_written(capsys):
    out, _ = run_report(capsys, "--tables", "2")
    assert out == (FIXTURES / "expected_table2.md").read_text()


def test_table2_latex_is_booktabs_with_the_right_cells(capsys):
    out, _ = run_report(capsys, "--tables", "2", "--format", "latex")
    for command in (r"\begin{tabular}{llrrrrrr}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert command in out
    rows = latex_rows(out)
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    assert header == ["model", "source", "ade150", "pc59", "cityscapes", "voc20", "cocostuff171", "toyworld"]
    assert all(len(r) == len(header) for r in rows)
    assert body["SILC-C"][:4] == ["SILC-C", "paper", "19.3", "31.6"]
    assert body["silc-c-b16"] == ["silc-c-b16", "measured", "19.3$^{1}$", "31.6", "--", "--", "--", "87.0"]
    assert body["siglip-b16-256 (limited)"][2:4] == ["13.0", "--"]
    assert r"$^{1}$ silc-c-b16, zs-seg ade150 mIoU: 2 records" in out
    # The paper rows come first, then a rule, then the measured ones.
    assert out.index("SILC-S & paper") < out.index(r"\midrule" + "\nsiglip-b16-256 & measured")


def test_latex_escapes_special_characters():
    assert report.latex_escape("zs_ade150 50% & #1 {x} ~^\\") == \
        r"zs\_ade150 50\% \& \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"


def test_table2_csv_has_plain_cells_and_notes_on_stderr(capsys):
    out, err = run_report(capsys, "--tables", "2", "--format", "csv")
    rows = parse_csv(out)
    assert list(rows[0]) == ["model", "source", "ade150", "pc59", "cityscapes", "voc20", "cocostuff171", "toyworld"]
    by_model = {r["model"]: r for r in rows}
    assert len(rows) == 10 + 3
    assert by_model["TCL"] == {"model": "TCL", "source": "paper", "ade150": "14.9", "pc59": "30.3", "cityscapes": "23.1",
                               "voc20": "77.5", "cocostuff171": "19.6", "toyworld": ""}
    assert by_model["silc-c-b16"] == {"model": "silc-c-b16", "source": "measured", "ade150": "19.3", "pc59": "31.6",
                                      "cityscapes": "", "voc20": "", "cocostuff171": "", "toyworld": "87.0"}
    assert by_model["siglip-b16-256"]["pc59"] == "22.7" and by_model["siglip-b16-256"]["ade150"] == ""
    assert by_model["siglip-b16-256 (limited)"]["ade150"] == "13.0"
    assert "table2.csv note [1]" in err and "archive/zs-seg/silc-c-b16/ade150.json" in err


def test_table6_gets_zero_shot_cells_and_empty_open_vocab_cells(capsys):
    out, _ = run_report(capsys, "--tables", "6", "--format", "csv")
    rows = {r["variant"]: r for r in parse_csv(out)}
    silc = rows["silc-c-b16"]
    assert (silc["zs_ade150"], silc["zs_pc59"], silc["zs_cocostuff171"]) == ("19.3", "31.6", "")
    assert silc["ov_pc459"] == silc["ov_ade150"] == silc["ov_pc59"] == silc["imagenet_zs_top1"] == ""
    assert rows["siglip-b16-256 (limited)"]["zs_ade150"] == "13.0"
    assert "toyworld" not in parse_csv(out)[0]  # extra zs-seg datasets belong to Table 2 only
    assert rows["+ EMA"]["ov_pc459"] == "19.0" and rows["+ EMA"]["source"] == "paper"


def test_default_tables_are_the_ones_the_records_fill(capsys):
    out, _ = run_report(capsys)
    assert out.startswith("Table 2:") and "\nTable 6:" in out
    assert "Table 1:" not in out and "Table 3:" not in out


def test_no_paper_rows_and_out_dir(capsys, tmp_path):
    out, _ = run_report(capsys, "--tables", "2,3", "--no-paper-rows", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table2.md", "table3.md"]
    assert "wrote" in out and "table2.md" in out
    table2 = (tmp_path / "table2.md").read_text()
    assert "| paper |" not in table2 and "| silc-c-b16 | measured | 19.3 [1] |" in table2
    # Table 3 (ov-seg) has no records: header only, and its measured method would be CAT-Seg.
    table3 = (tmp_path / "table3.md").read_text()
    assert "| vlm | method | source | ade847 |" in table3 and "measured" not in table3


def test_newest_record_wins_a_cell(tmp_path, capsys):
    shutil.copytree(RECORDS, tmp_path / "records")
    newer = json.loads((RECORDS / "archive/zs-seg/silc-c-b16/ade150.json").read_text())
    newer["created"] = "2024-07-01T00:00:00+00:00"
    (tmp_path / "records/archive/zs-seg/silc-c-b16/ade150.json").write_text(json.dumps(newer))
    config = report.load_tables_config()
    table = report.build_table(2, config[2], report.load_records([tmp_path / "records"]))
    row = next(r for r in table.rows if r.keys == ["silc-c-b16"])
    assert round(row.cells[0], 3) == 18.871 and row.notes[0] == 1
    assert "shown the newest, 18.9 (2024-07-01" in table.notes[0]


def test_invalid_records_are_skipped_with_a_warning_naming_the_file(tmp_path, capsys):
    shutil.copytree(RECORDS / "zs-seg", tmp_path / "zs-seg")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    no_dataset = json.loads((RECORDS / "zs-seg/silc-c-b16/pc59.json").read_text())
    del no_dataset["dataset"]["name"]
    (tmp_path / "no_name.json").write_text(json.dumps(no_dataset))
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial/x.json").write_text("{")  # work files are not searched
    records = report.load_records([tmp_path])
    err = capsys.readouterr().err
    assert len(records) == 5
    for name in ("broken.json", "other.json", "no_name.json"):
        assert f"skipping {tmp_path / name}" in err
    assert ".partial" not in err


def test_model_label_falls_back_to_the_spec():
    record = {"model": {"spec": "/ckpt/my.npz"}, "dataset": {"name": "ade150", "limited": True}}
    assert report.model_label(record) == "/ckpt/my.npz (limited)"
    assert report.model_label({"model": {"registry_name": "silc-s-b16", "spec": "silc-s-b16"},
                               "dataset": {"name": "pc59", "limited": False}}) == "silc-s-b16"


def test_config_maps_every_paper_column():
    config = report.load_tables_config()
    assert sorted(config) == [1, 2, 3, 4, 5, 6]
    for number, spec in config.items():
        fields, _ = report.read_paper_csv(spec)  # raises if a column is unmapped
        assert (PAPER_DIR / spec["csv"]).exists()
        assert set(fields) == set(spec["row_key"]) | set(spec["columns"]), number
    assert config[2]["columns"]["ade150"] == ("zs-seg", "ade150", "mIoU")
    assert config[6]["columns"]["zs_ade150"] == ("zs-seg", "ade150", "mIoU")
    # CAT-Seg's numbers (Table 3, Table 6's ov columns) are detectron2's classes-present mean.
    assert config[6]["columns"]["ov_pc459"] == ("ov-seg", "pc459", "mIoU_present")
    assert config[3]["columns"]["ade847"] == ("ov-seg", "ade847", "mIoU_present")


@pytest.mark.parametrize("tables", ["7", "two", ","])
def test_bad_table_list_is_a_user_error(tables, capsys):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    with pytest.raises(UserError):
        report.main(parser.parse_args(["--records", str(RECORDS), "--tables", tables]))


def test_missing_records_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        report.load_records([tmp_path / "nope"])


def test_no_filled_table_is_a_user_error(tmp_path):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    with pytest.raises(UserError, match="no result record fills"):
        report.main(parser.parse_args(["--records", str(tmp_path)]))
