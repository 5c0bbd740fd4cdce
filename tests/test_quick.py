"""quick.py at its tiny size on generated images: the plumbing (every stage runs through the scripts'
own main(), the outputs exist and hold percentages, a second call skips or resumes), not the science."""
import json
import os
import zipfile
from io import BytesIO

import pytest
import torch
from PIL import Image

import quick
from addt_common import UserError


def image_zip(path, n_per_class=4, classes=10):
    """An image-folder zip (train/ and test/, a colour per class): the layout load_split reads."""
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(classes, 3, generator=g)
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for c in range(classes):
                for k in range(n_per_class):
                    x = (colours[c].view(1, 1, 3) + 0.1 * torch.rand(32, 32, 3, generator=g)).clamp(0, 1)
                    buf = BytesIO()
                    Image.fromarray((x * 255).byte().numpy()).save(buf, format="PNG")
                    z.writestr(f"{split}/class{c}/{k}.png", buf.getvalue())
    return str(path)


def finals(out):
    """The file that marks each stage finished, with its modification time."""
    paths = [os.path.join(out, "classifier", "classifier.pt")]
    paths += [os.path.join(out, m, "ema") for m in quick.MODELS]
    paths += [os.path.join(d, "summary.json") for d in sorted(glob_dirs(os.path.join(out, "attack")))]
    return {p: os.stat(p).st_mtime_ns for p in paths}


def glob_dirs(root):
    return [os.path.join(root, d) for d in os.listdir(root)]


def test_tiny_preset_runs_every_stage_then_resumes(tmp_path):
    data = image_zip(tmp_path / "images.zip")
    out = str(tmp_path / "quick")
    argv = ["--size", "tiny", "--data", data, "--out", out, "--device", "cpu"]
    timings = quick.main(argv)
    n_stages = 4 + 1 + len(quick.MODELS) * len(quick.SAMPLERS) * len(quick.SETTINGS)
    assert len(timings) == n_stages and all(t["status"] == "ran" for t in timings.values())

    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["attacks"]) == n_stages - 5
    for s in list(results["attacks"].values()) + [results["classifier_alone"]]:
        assert 0 <= s["clean_accuracy"] <= 100 and 0 <= s["robust_accuracy"] <= 100
        assert s["n"] == quick.SIZES["tiny"]["n"]
    assert all(0 <= v["accuracy"] <= 100 for v in results["purified_clean"].values())
    assert set(results["timings"]) == set(timings) and results["machine"]["torch"] == torch.__version__
    readme = open(os.path.join(out, "README.md")).read()
    assert "claim (i) DP_DDPM" in readme and "claim (ii) DP_DDIM" in readme and "| classifier alone |" in readme
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(out, "settings.png")) > 0
    except ImportError:
        assert "pip install matplotlib" in results["figure"]

    # a second call redoes nothing; an interrupted training stage and an attack whose summary is missing
    # are continued by the scripts' own --resume
    before = finals(out)
    os.remove(os.path.join(out, "addt", "quick-done.json"))
    os.remove(os.path.join(out, "attack", "vanilla-ddim-dw-fwd", "summary.json"))
    timings = quick.main(argv)
    redone = {"addt", "attack vanilla ddim dw-fwd"}
    assert {k for k, t in timings.items() if t["status"] == "resumed"} == redone
    assert all(t["status"] == "skipped" for k, t in timings.items() if k not in redone)
    after = finals(out)
    rewritten = {os.path.join(out, "addt", "ema"), os.path.join(out, "attack", "vanilla-ddim-dw-fwd", "summary.json")}
    assert {p for p in before if before[p] != after[p]} <= rewritten


def test_other_sizes_refused_in_the_same_out(tmp_path):
    out = str(tmp_path / "quick")
    os.makedirs(out)
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump({"size": "tiny", "data": "x", "device_type": "cpu", "sizes": {}}, f)
    with pytest.raises(UserError, match="other settings"):
        quick.main(["--size", "tiny", "--data", "x", "--out", out, "--device", "cpu"])
