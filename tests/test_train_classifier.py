import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train_classifier
from addt_common import UserError
from addt_data import load_split, to_float
from models import load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 50, 40)}
TIMING = ("images_per_s",)  # the only history entries that may differ between runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/{train,test}/<class>/*.png: 3 classes x 40 train / 10 test, a colour per class plus noise."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for name, rgb in COLOURS.items():
            os.makedirs(root / split / name)
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
    return str(root)


def flags(folder, out, *more):
    return ["--data", folder, "--out", str(out), "--arch", "wrn-10-1", "--global-batch", "16", "--lr", "0.05",
            *more]


def timeless(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_tiny_run_learns_and_saves(folder, tmp_path, capsys):
    res = train_classifier.main(flags(folder, tmp_path, "--epochs", "3"))
    losses = [h["train_loss"] for h in res["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    out = capsys.readouterr().out
    assert "| arch |" in out and "epoch 3/3" in out and "ETA" in out

    # classifier.pt: the loader's format, and the accuracy it gives is the one reported
    classifier = load_classifier(str(tmp_path / "classifier.pt"))
    assert torch.load(tmp_path / "classifier.pt", weights_only=True).keys() >= {"arch", "model", "history"}
    test = load_split(folder, "test")
    with torch.no_grad():
        acc = (classifier(to_float(test.images)).argmax(1) == test.labels).float().mean().item()
    assert acc == pytest.approx(res["test_acc"], abs=1e-6)
    results = json.load(open(tmp_path / "results.json"))
    assert results["test_acc"] == res["test_acc"] and results["args"]["arch"] == "wrn-10-1"
    assert len(results["history"]) == 3 and results["images_per_s"] > 0
    assert json.load(open(tmp_path / "args.json"))["epochs"] == 3
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and "optimizer" in ckpt


def test_resume_is_exact(folder, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    more = ("--epochs", "2", "--max-steps-per-epoch", "4")
    train_classifier.main(flags(folder, whole, *more))

    real_save = train_classifier.atomic_save

    def save_then_die(obj, path):  # the job is killed right after the first epoch's checkpoint
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_classifier, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_classifier.main(flags(folder, parts, *more))
    monkeypatch.setattr(train_classifier, "atomic_save", real_save)
    assert torch.load(parts / "ckpt.pt", weights_only=True)["epoch"] == 1
    train_classifier.main(flags(folder, parts, *more, "--resume"))

    a = torch.load(whole / "classifier.pt", weights_only=True)
    b = torch.load(parts / "classifier.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert timeless(a["history"]) == timeless(b["history"])
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (whole, parts))
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    for k, v in ca["optimizer"]["state"].items():  # momentum buffers too
        assert torch.equal(v["momentum_buffer"], cb["optimizer"]["state"][k]["momentum_buffer"])


def test_torchrun_two_processes(folder, tmp_path, torchrun):
    p = torchrun("train_classifier.py", *flags(folder, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "3"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "(2 x 8)" in p.stdout and "| arch |" in p.stdout
    classifier = load_classifier(str(tmp_path / "classifier.pt"), arch="wrn-10-1")
    assert classifier.net.num_classes == 3
    results = json.load(open(tmp_path / "results.json"))
    assert results["world"] == 2 and results["eval_n"] == 30


def test_torchrun_batch_must_split(folder, tmp_path, torchrun):
    p = torchrun("train_classifier.py", *flags(folder, tmp_path, "--global-batch", "15"))
    assert p.returncode != 0 and "error: --global-batch 15 does not split evenly over 2 processes" in p.stderr


def test_errors(folder, tmp_path):
    with pytest.raises(UserError, match="unknown arch 'resnet-7'"):
        train_classifier.main(flags(folder, tmp_path, "--arch", "resnet-7"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="no 'train' split of any known data set in .*empty"):
        train_classifier.main(flags(str(tmp_path / "empty"), tmp_path))
    with pytest.raises(UserError, match="classifier training checkpoint not found"):
        train_classifier.main(flags(folder, tmp_path / "nothing", "--resume"))
    train_classifier.main(flags(folder, tmp_path / "w", "--epochs", "1", "--max-steps-per-epoch", "1"))
    with pytest.raises(UserError, match="holds a wrn-10-1 training checkpoint, not one of --arch wrn-16-1"):
        train_classifier.main(flags(folder, tmp_path / "w", "--arch", "wrn-16-1", "--resume"))
    with pytest.raises(UserError, match="fewer than --global-batch 256"):
        train_classifier.main(flags(folder, tmp_path, "--global-batch", "256"))
