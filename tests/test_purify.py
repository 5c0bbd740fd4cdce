"""purify.py end to end on the tiny smoke models: outputs, sharding and clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import attack
import purify
from addt_common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(smoke_inputs):
    return smoke_inputs


def argv(inputs, out, *extra):
    return ["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"],
            "--nfe", "5", "--num-images", "12", "--batch-size", "5", "--device", "cpu", "--out", str(out), *extra]


def test_outputs_and_sharded_totals(inputs, tmp_path, torchrun):
    res = purify.main(argv(inputs, tmp_path / "one"))
    saved = json.load(open(tmp_path / "one" / "results.json"))
    assert saved["timesteps"] == [100, 80, 60, 40, 20, 0] == res["timesteps"]
    assert saved["args"]["defense"] == "ddpm" and saved["args"]["seed"] == 0 and saved["n"] == 12
    assert saved["classifier_accuracy"] > 75  # the smoke classifier knows its colours (11 of the first 12)
    lo, hi = saved["purified_accuracy_ci95"]
    assert lo <= saved["purified_accuracy"] <= hi and saved["purifier"]["model_calls"] == 6
    assert 0 <= saved["purified_accuracy"] <= 100
    grid = Image.open(tmp_path / "one" / "grid.png")
    assert grid.size == (8 * 32, 3 * 32)  # rows: original, diffused, purified

    # another batch size gives the same totals; so do two processes
    assert purify.main(argv(inputs, tmp_path / "b3", "--batch-size", "3"))["purified_accuracy"] == res["purified_accuracy"]
    proc = torchrun("purify.py", *argv(inputs, tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.load(open(tmp_path / "ddp" / "results.json"))
    assert (ddp["classifier_accuracy"], ddp["purified_accuracy"]) == (res["classifier_accuracy"], res["purified_accuracy"])


def test_ddim_default_nfe_and_deterministic_reverse(inputs, tmp_path):
    args = purify.parse_args(["--sampler", "ddim"])
    assert args.nfe == 10 and purify.parse_args([]).nfe == 100  # SPEC: DDIM n = 100, DDPM n = 1000
    res = purify.main(argv(inputs, tmp_path, "--sampler", "ddim", "--grid", "0"))
    assert res["timesteps"] == [100, 80, 60, 40, 20, 0]
    assert not (tmp_path / "grid.png").exists()


def test_clear_errors(inputs, tmp_path):
    with pytest.raises(UserError, match="does not divide"):
        purify.main(argv(inputs, tmp_path, "--nfe", "3"))
    with pytest.raises(UserError, match="google/ddpm-cifar10-32"):
        purify.main(argv(inputs, tmp_path, "--ddpm", str(tmp_path / "missing")))
    with pytest.raises(UserError, match="not found"):
        purify.main(argv(inputs, tmp_path, "--classifier", str(tmp_path / "missing.pt")))
    with pytest.raises(UserError, match="holds 200 images"):
        purify.main(argv(inputs, tmp_path, "--num-images", "5000"))
    with pytest.raises(UserError, match="does not match"):  # a UNet checkpoint of another config
        bad = tmp_path / "bad"
        from models.unet import UNet
        UNet({**attack.TINY_UNET_CONFIG, "block_out_channels": [8, 16]}).save_pretrained(str(bad))
        cfg = json.load(open(bad / "config.json"))
        json.dump({**cfg, "block_out_channels": [16, 32]}, open(bad / "config.json", "w"))
        purify.main(argv(inputs, tmp_path, "--ddpm", str(bad)))
    other = tmp_path / "clf100.pt"
    from models import build_classifier, classifier_checkpoint
    torch.save(classifier_checkpoint(build_classifier("wrn-10-1", 100), "wrn-10-1"), other)
    with pytest.raises(UserError, match="100 classes"):
        purify.main(argv(inputs, tmp_path, "--classifier", str(other)))
    proc = subprocess.run([sys.executable, "purify.py", "--classifier", str(other)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
