"""bench.py's small version runs and writes every section, and the GPU check runs its parts in order,
each isolated and bounded by the time left, into one report. Speeds are not asserted: they are measured
by the script, never by tests (STYLE.md)."""
import json
import os
import sys
import time

import pytest
import torch

import bench


def numbers(obj):
    """Every int and float in a nested dict / list (booleans are not numbers here)."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in numbers(x)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_small_bench_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--small", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["device"] and res["torch"] and res["settings"]["small"] and res["settings"]["repeats"] > 0
    for section in ("unet", "attack", "addt", "rbgm", "ddpm_step", "vpsde", "edm"):
        values = numbers(res[section])
        assert values and all(v > 0 for v in values), (section, res[section])
    assert [r["setting"] for r in res["unet"]["rows"]][:1] == ["fp32"]
    for family in ("attack", "vpsde", "edm"):
        rows = {r["path"]: r for r in res[family]["rows"]}
        assert list(rows) == ["official", "default", "fast, eager", "fast"]
        assert "compile-cpu" in rows["fast"]["skipped"]  # compiling takes minutes on the CPU
        for name in ("official", "default", "fast, eager"):
            assert rows[name]["pipelines/s"] > 0 and rows[name]["1024-img PGD20 s"] > 0, rows[name]
        assert rows["official"]["speed-up"] == 1 and rows["default"]["chunk"] == 8  # the small size's chunk
        assert rows["fast, eager"]["checkpoint"] is True and rows["fast, eager"]["flags"] == "--fast --no-compile"
    assert {r["path"] for r in res["addt"]["rows"]} == {"default", "fast, eager", "fast"}
    assert len(res["rbgm"]) == len(bench.SMALL["rbgm_shapes"])
    assert "CUDA" in res["memory"]["skipped"]  # no GPU: the section says why
    printed = capsys.readouterr().out
    assert all(f"## {i}." in printed for i in range(1, 9))


def test_a_failing_row_is_that_rows_result():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cpu = torch.device("cpu")
    assert bench.guarded("fast", oom, cpu) == {"path": "fast", "error": "CUDA out of memory: CUDA out of memory. "
                                                                          "Tried to allocate 2.00 GiB"}
    assert bench.guarded("x", lambda: 1 / 0, cpu)["error"].startswith("ZeroDivisionError")
    assert "not started" in bench.guarded("x", lambda: {}, cpu, deadline=time.time() + 5, need_s=60)["skipped"]
    assert bench.guarded("x", lambda: {"pipelines/s": 3.0}, cpu) == {"path": "x", "pipelines/s": 3.0}


def test_check_isolates_its_parts_and_keeps_to_the_budget(tmp_path):
    """A part that fails or hangs is reported and the next one runs; a part is not started with less than
    min_s left; the report is written after every part; --check-resume keeps the finished ones."""
    py = sys.executable
    cmds = [("ok", [py, "-c", "print('fine')"], 30), ("fails", [py, "-c", "import sys; sys.exit(3)"], 30),
            ("hangs", [py, "-c", "import time; time.sleep(60)"], 3), ("after", [py, "-c", "print(1)"], 30),
            ("late", [py, "-c", "print(2)"], 30)]
    t0 = time.time()
    report = bench.run_check(cmds, str(tmp_path), budget=10, min_s=8)
    took = time.time() - t0
    status = {k: v["status"] for k, v in report["parts"].items()}
    assert status == {"ok": "ok", "fails": "failed", "hangs": "timed out", "after": "skipped", "late": "skipped"}
    assert report["parts"]["fails"]["exit"] == 3 and 3 <= report["parts"]["hangs"]["seconds"] < 6
    assert "s left of the budget" in report["parts"]["after"]["reason"]  # 10 - 3 s < 8
    assert took < 10 and report["total s"] <= took
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved["parts"].keys() == report["parts"].keys()
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| hangs | timed out |" in md and "| late | skipped |" in md
    again = bench.run_check(cmds[:1], str(tmp_path), budget=12, resume=True)
    assert again["parts"]["ok"]["kept"]


def test_whole_gpu_check_with_a_tiny_budget(tmp_path):
    """Every part of the real check, on the CPU with 16 s: the first runs until its time is up, the others
    are reported as skipped (fewer than 15 s left), and the report names them all."""
    out = tmp_path / "check"
    t0 = time.time()
    report = bench.main(["--gpu-check", "--small", "--check-budget", "16", "--check-out", str(out)])
    assert time.time() - t0 < 16 + 5
    assert list(report["parts"]) == bench.CHECK_PARTS
    assert report["parts"]["tests"]["status"] in ("timed out", "ok", "failed")
    assert all(v["status"] == "skipped" for k, v in report["parts"].items() if k != "tests")
    assert (out / "gpu-check.md").read_text().count(" skipped |") == len(bench.CHECK_PARTS) - 1


def test_gpu_check_parts_on_the_cpu(smoke_inputs, tmp_path):
    """Three real parts: kernels and unet run, the precision check fails (its data are missing) without
    stopping the unet part after it; their numbers are in the report."""
    models = tmp_path / "models"
    os.makedirs(models / "ddpm")
    (models / "classifier.pt").write_bytes(open(smoke_inputs["classifier"], "rb").read())
    out = tmp_path / "check"
    report = bench.main(["--gpu-check", "--small", "--check-budget", "300", "--check-out", str(out), "--check-parts",
                         "kernels,precision,unet", "--check-models", str(models), "--check-data",
                         str(tmp_path / "no-data")])
    parts = report["parts"]
    assert [parts[p]["status"] for p in ("kernels", "precision", "unet")] == ["ok", "failed", "ok"], parts
    assert "no-data not found" in parts["precision"]["log tail"]
    assert parts["kernels"]["result"]["rbgm"] and parts["unet"]["result"]["unet"]["rows"]
    md = (out / "gpu-check.md").read_text()
    assert "## kernels" in md and "## unet" in md and "| precision | failed |" in md


def test_precision_check_on_prepared_models(smoke_inputs, tmp_path):
    """bench.py --check-prepare (quick.py's classifier and UNet stages; tiny here) and the precision check
    on those models: fp32 and bf16 on the same images and seeds, compared image by image."""
    models = tmp_path / "gpu" / "models"
    common = ["--check-out", str(tmp_path / "check"), "--check-models", str(models)]
    bench.main(["--check-prepare", "--check-prepare-size", "tiny", "--check-data-source", smoke_inputs["data"],
                *common])
    assert (models / "classifier.pt").is_file() and (models / "ddpm" / "unet" / "config.json").is_file()
    res = bench.main(["--check-part", "precision", "--small", "--check-data", smoke_inputs["data"], *common])
    assert res["models"]["kind"] == "prepared" and res["n"] == 4
    assert res["robust_difference_points"] == res["bf16"]["robust_accuracy"] - res["fp32"]["robust_accuracy"]
    assert 0 <= res["images_deciding_differently"] <= 4 and "fp32" in res["verdict"] or "within" in res["verdict"]
    assert json.loads((tmp_path / "check" / "parts" / "precision.json").read_text())["verdict"] == res["verdict"]
