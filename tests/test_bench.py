"""bench.py's small version runs and writes every section. Speeds are not asserted: they are measured
by the script, never by tests (STYLE.md)."""
import json

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
    bench.main(["--small", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["device"] and res["torch"] and res["settings"]["small"] and res["settings"]["repeats"] > 0
    for section in ("unet", "attack", "addt", "rbgm", "ddpm_step"):
        values = numbers(res[section])
        assert values and all(v > 0 for v in values), (section, res[section])
    assert [r["setting"] for r in res["unet"]["rows"]][:1] == ["fp32"]
    assert {r["path"] for r in res["attack"]["rows"]} == {"official", "ours"}
    assert len(res["rbgm"]) == len(bench.SMALL["rbgm_shapes"])
    if "skipped" in res["memory"]:  # no GPU: the section says why
        assert "CUDA" in res["memory"]["skipped"]
    else:
        assert numbers(res["memory"]) and all(v > 0 for v in numbers(res["memory"]))
    printed = capsys.readouterr().out
    assert all(f"## {i}." in printed for i in range(1, 7))


def test_runbook_writes_one_report(smoke_inputs, tmp_path):
    """The GPU runbook's report on the CPU at the small size: the bench step (one section) and the bf16 vs
    fp32 precision check (on the smoke models when the quick preset has not run), merged into one JSON
    and one markdown file; a second call adds to the same report."""
    out = tmp_path / "runbook"
    common = ["--runbook", "--small", "--runbook-out", str(out), "--runbook-data", smoke_inputs["data"]]
    bench.main(common + ["--runbook-steps", "bench", "--only", "rbgm"])
    report = bench.main(common + ["--runbook-steps", "precision"])
    saved = json.loads((out / "runbook.json").read_text())
    assert set(saved) >= {"bench", "precision", "machine"} and "error" not in saved["bench"], saved
    p = report["precision"]
    assert "error" not in p and p["robust_difference_points"] == p["bf16"]["robust_accuracy"] - p["fp32"]["robust_accuracy"]
    assert 0 <= p["images_deciding_differently"] <= 4
    md = (out / "runbook.md").read_text()
    assert "## bench" in md and "## precision" in md and "robust accuracy fp32" in md
