"""--precision: a recorded choice that is part of the record's identity; bf16 runs on a CPU."""
import pytest

from silc_bench.cli import main
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.results.record import read_record

SMALL = ["--protocol", "short_side=32", "--protocol", "crop=32", "--protocol", "stride=16", "--workers", "0",
         "--no-progress"]


def test_bf16_runs_and_is_recorded_beside_fp32(tiny_big_vision_npz, tmp_path, capsys):
    write_segmentation_fixture("ade150", tmp_path / "data", num_images=2, size=(32, 48), seed=4)
    args = ["run", "zs-seg", "--model", str(tiny_big_vision_npz), "--datasets", "ade150",
            "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *SMALL]
    assert main(args) == 0
    assert main([*args, "--precision", "bf16"]) == 0  # not skipped: the fp32 record is another record
    (fp32,) = [p for p in (tmp_path / "out").rglob("ade150.json")]
    (bf16,) = [p for p in (tmp_path / "out").rglob("ade150@bf16.json")]
    a, b = read_record(fp32), read_record(bf16)
    assert a["precision"] == {"mode": "fp32", "autocast": False}
    assert b["precision"]["mode"] == "bf16" and b["precision"]["autocast"] is True
    assert "cpu_bf16_instructions" in b["precision"]
    assert 0 <= b["metrics"]["mIoU"] <= 100
    table = capsys.readouterr().out.split("Table 2")[-1]
    assert "(bf16)" in table  # its own row in the printed table


def test_fp16_on_a_cpu_is_refused(tiny_big_vision_npz, tmp_path, capsys):
    code = main(["run", "zs-seg", "--model", str(tiny_big_vision_npz), "--datasets", "ade150", "--device", "cpu",
                 "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--precision", "fp16"])
    assert code == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))


def test_compile_is_recorded_as_its_own_record(tiny_big_vision_npz, tmp_path, capsys, monkeypatch):
    """--compile wraps the image path in torch.compile (stubbed here: the compiler's run time is
    not what this checks) and writes `<dataset>@compiled.json` with its own table row."""
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn.__name__, kw)) or fn)
    write_segmentation_fixture("ade150", tmp_path / "data", num_images=2, size=(32, 48), seed=4)
    args = ["run", "zs-seg", "--model", str(tiny_big_vision_npz), "--datasets", "ade150",
            "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *SMALL]
    assert main(args) == 0 and not compiled
    assert main([*args, "--compile"]) == 0  # not skipped: the eager record is another record
    assert compiled == [("dense_features", {"dynamic": False}), ("encode_image", {"dynamic": False})]
    (eager,) = [p for p in (tmp_path / "out").rglob("ade150.json")]
    (comp,) = [p for p in (tmp_path / "out").rglob("ade150@compiled.json")]
    assert "compiled" not in read_record(eager)["precision"]
    assert read_record(comp)["precision"]["compiled"].startswith("torch.compile")
    assert read_record(comp)["metrics"] == read_record(eager)["metrics"]  # stubbed compiler: same arithmetic
    table = capsys.readouterr().out.split("Table 2")[-1]
    assert "(compiled)" in table


@pytest.mark.slow
def test_compiled_dense_features_agree_with_eager(tiny_big_vision_npz):
    """The real compiler on the CPU (inductor, C++): the same features up to rounding."""
    import torch

    from silc_bench.checkpoints import load_model
    from silc_bench.precision import compile_model

    model = load_model(str(tiny_big_vision_npz))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = model.dense_features(pixels)
        compiled = compile_model(model).dense_features(pixels)
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
