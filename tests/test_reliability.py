"""What happens when things go wrong (issue "Reliability"): no number computed from NaN, one `error:`
line (exit 2, no traceback) for every user mistake before any expensive work, nothing lost or silently
replaced (locks, atomic writes, exact and checked resume). The attack's own cases are in test_attack.py."""
import copy
import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import attack
import bench
import purify
import train_addt
import train_classifier
from addt_common import UserError, atomic_save, lock_out, read_jsonl, unlock_out
from addt_data import load_split
from addt_diffusion import load_unet
from models import load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["attack.py", "purify.py", "train_classifier.py", "train_addt.py", "bench.py"]


@pytest.fixture(scope="module")
def inputs(smoke_inputs):
    return smoke_inputs


def run(script, *args, timeout=60):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc):
    """exit status 2, stderr a single 'error: ...' line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr


def addt_flags(inputs, out, *more):
    cgpo = [] if {"none", "scratch"} & set(more) else ["--cgpo-iters", "1"]  # --perturb none refuses CGPO's flags
    return ["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"], "--out", str(out),
            "--device", "cpu", "--global-batch", "4", *cgpo, *more]


def clf_flags(inputs, out, *more):
    return ["--data", inputs["data"], "--out", str(out), "--arch", "wrn-10-1", "--global-batch", "20",
            "--max-steps-per-epoch", "2", "--eval-n", "20", "--device", "cpu", *more]


# ---------------------------------------------------------------- 1. never a number computed from NaN

def test_classifier_training_stops_at_a_nonfinite_loss(inputs, tmp_path, monkeypatch):
    real = train_classifier.random_crop_flip
    calls = []

    def nan_on_step_3(x, *a, **k):
        calls.append(1)
        out = real(x, *a, **k)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(train_classifier, "random_crop_flip", nan_on_step_3)
    with pytest.raises(UserError, match="non-finite training loss at step 1 of this epoch"):
        train_classifier.main(clf_flags(inputs, tmp_path, "--epochs", "3"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # epoch 1 finished, epoch 2 broke at its first step
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "classifier.pt").exists()


def test_addt_stops_when_the_cgpo_loss_is_nonfinite(inputs, tmp_path, monkeypatch):
    """A NaN classifier used to train on with cgpo_before=nan: the step is not applied and the run stops."""
    real = train_addt.guidance_loss
    monkeypatch.setattr(train_addt, "guidance_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(UserError, match="non-finite loss or gradient at step 1"):
        train_addt.main(addt_flags(inputs, tmp_path, "--max-steps", "3"))
    bad = torch.load(tmp_path / "nonfinite-step1.pt", weights_only=True)
    start = load_unet(inputs["ddpm"]).state_dict()
    assert all(torch.equal(bad["model"][k], v) for k, v in start.items())  # the NaN step changed nothing


def test_checkpoints_with_nonfinite_weights_are_refused(inputs, tmp_path):
    from models.unet import UNet
    unet = UNet.from_pretrained(inputs["ddpm"])
    with torch.no_grad():
        unet.conv_out.bias[0] = float("nan")
    unet.save_pretrained(str(tmp_path / "nan-unet"))
    with pytest.raises(UserError, match=r"non-finite weights \(NaN or inf in conv_out.bias\)"):
        load_unet(str(tmp_path / "nan-unet"))
    ckpt = torch.load(inputs["classifier"], weights_only=True)
    ckpt["model"]["fc.weight"][0, 0] = float("inf")
    torch.save(ckpt, tmp_path / "nan-clf.pt")
    proc = run("purify.py", "--ddpm", inputs["ddpm"], "--classifier", tmp_path / "nan-clf.pt", "--data",
               inputs["data"], "--n", "4", "--out", tmp_path / "p")
    assert one_error_line(proc) and "fc.weight" in proc.stderr, proc.stderr


def test_purify_refuses_nonfinite_purification(inputs, tmp_path, monkeypatch):
    import addt_diffusion
    real = addt_diffusion.ddpm_purify
    monkeypatch.setattr(addt_diffusion, "ddpm_purify", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(UserError, match=r"non-finite purified images for image\(s\) \[0, 1, 2, 3\]"):
        purify.main(["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"],
                     "--n", "4", "--nfe", "5", "--device", "cpu", "--grid", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------- 2. every numeric flag checked up front

BAD_FLAGS = {
    "purify.py": [["--n", "0"], ["--batch-size", "0"], ["--grid", "-1"], ["--t-star", "nan"], ["--t-star", "inf"],
                  ["--eta", "0.5"], ["--defense", "ddim", "--eta", "5"], ["--defense", "ddim", "--eta", "nan"],
                  ["--seed", "-1"], ["--device", "tpu9"], ["--device", "cuda"], ["--nfe", "0"],
                  ["--defense", "edm", "--sigma-max", "-1"], ["--classifier-norm", "1,2/3"],
                  ["--defense", "ddpm", "--edm-steps", "5"]],
    "attack.py": [["--eps", "-0.1"], ["--eps", "nan"], ["--step-size", "-1"], ["--seed", "-3"], ["--device", "gpu"],
                  ["--steps", "-1"], ["--attack", "apgd-ce", "--steps", "0"], ["--eot", "0"],
                  ["--protocol", "worst-0"], ["--protocol", "best-3"], ["--attack", "apgd-ce", "--step-size", "0.1"],
                  ["--attack", "apgd-dlr", "--track", "best"], ["--trajectory-deltas", "2"], ["--restarts", "2"],
                  ["--defense", "none", "--nfe", "5"], ["--chunk", "0"], ["--preset", "smoke", "--eps", "0.1"]],
    "train_classifier.py": [["--global-batch", "0"], ["--eval-n", "0"], ["--eval-batch", "-5"], ["--lr", "0"],
                            ["--lr", "nan"], ["--weight-decay", "-1"], ["--max-steps-per-epoch", "0"],
                            ["--epochs", "0"], ["--seed", "-1"], ["--extend"]],
    "train_addt.py": [["--ckpt-every", "0"], ["--log-every", "0"], ["--max-steps", "0"], ["--epochs", "0"],
                      ["--cgpo-iters", "0"], ["--grad-clip", "0"], ["--lambda-max", "1.5"], ["--lambda-min", "-0.1"],
                      ["--ema-max-decay", "1"], ["--dropout", "1"], ["--lr", "nan"], ["--t-max", "0"],
                      ["--model", "edm", "--t-max", "0.5"]],
    "bench.py": [["--repeats", "0"], ["--only", "nothing"]],
}


@pytest.mark.parametrize("script,bad", [(s, b) for s, bads in BAD_FLAGS.items() for b in bads],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_flags_are_refused_before_loading(script, bad, monkeypatch):
    """parse_args refuses each bad value (with no file given, nothing could be loaded anyway)."""
    module = __import__(script[:-3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError):
        module.parse_args(["--classifier", "x.pt", *bad] if script == "train_addt.py" else bad)


def test_bad_flag_is_one_line_exit_2_fast(tmp_path):
    t0 = time.time()
    proc = run("attack.py", "--eps", "nan", "--out", tmp_path)
    assert one_error_line(proc) and "--eps" in proc.stderr and time.time() - t0 < 20


# ---------------------------------------------------------------- 3. bad files: one line that names the file

def test_bad_weight_files_name_the_file(inputs, tmp_path):
    import shutil
    bad = tmp_path / "unet"
    shutil.copytree(inputs["ddpm"], bad)
    weights = bad / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"could not read the weights {weights}"):
        load_unet(str(bad))
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="could not read the weights"):
        load_unet(str(bad))
    shutil.copy(os.path.join(inputs["ddpm"], "diffusion_pytorch_model.safetensors"), weights)
    cfg = json.load(open(bad / "config.json"))
    for broken, why in (({**cfg, "layers_per_block": "1"}, "layers_per_block must be a non-negative integer"),
                        ({**cfg, "block_out_channels": []}, "block_out_channels must be a non-empty list")):
        json.dump(broken, open(bad / "config.json", "w"))
        with pytest.raises(UserError, match=why):
            load_unet(str(bad))
        with pytest.raises(UserError, match=f"--init scratch: UNet config: {why}"):  # the same check on this path
            train_addt.main(addt_flags(inputs, tmp_path / "scratch", "--init", "scratch", "--ddpm", str(bad)))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_unet(str(bad))
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = run("purify.py", "--ddpm", inputs["ddpm"], "--classifier", tmp_path / "empty.pt", "--out", tmp_path / "o")
    assert one_error_line(proc) and "empty.pt" in proc.stderr and "empty" in proc.stderr


def test_resume_with_a_classifier_checkpoint_is_refused(inputs, tmp_path):
    os.makedirs(tmp_path / "run")
    torch.save(torch.load(inputs["classifier"], weights_only=True), tmp_path / "run" / "ckpt.pt")
    with pytest.raises(UserError, match="is not a train_addt.py checkpoint"):
        train_addt.main(addt_flags(inputs, tmp_path / "run", "--resume"))


# ---------------------------------------------------------------- 4. outputs: checked first, locked, never half a file

@pytest.mark.parametrize("script", SCRIPTS)
def test_out_that_is_a_file_is_refused_at_once(script, tmp_path):
    """A file as --out, or a path under one: one error line, before anything is loaded (in-process: well
    under 2 s; the subprocess adds only the interpreter's and torch's start-up)."""
    (tmp_path / "file").write_text("x")
    module = __import__(script[:-3])
    extra = ["--classifier", "c.pt"] if script == "train_addt.py" else []
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        target = out / "bench.json" if script == "bench.py" else out
        t0 = time.time()
        with pytest.raises(UserError, match="file"):
            module.main(["--out", str(target), *extra])
        assert time.time() - t0 < 2
    proc = run(script, "--out", tmp_path / "file" / ("bench.json" if script == "bench.py" else ""), *extra)
    assert one_error_line(proc) and "file" in proc.stderr, (script, proc.stderr)


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from addt_common import lock_out
lock_out({out!r})
print("locked", flush=True)
time.sleep(60)
"""


def test_one_run_per_out_folder(inputs, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=REPO, out=str(out))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"another run \\(pid {holder.pid}\\) is writing to"):
            train_addt.main(addt_flags(inputs, out, "--max-steps", "1"))
        with pytest.raises(UserError, match="another run"):
            train_classifier.main(clf_flags(inputs, out, "--epochs", "1"))
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it, the next run takes the folder and notes the stop
    train_addt.main(addt_flags(inputs, out, "--max-steps", "1", "--perturb", "none"))


def test_stale_temporary_files_are_removed(inputs, tmp_path):
    out = tmp_path / "run"
    os.makedirs(out / "ema.tmp")
    (out / "ckpt.pt.12345.tmp").write_bytes(b"x" * 1000)
    (out / "ema.tmp" / "config.json").write_text("{}")
    train_addt.main(addt_flags(inputs, out, "--max-steps", "1", "--perturb", "none"))
    assert not any(n.endswith(".tmp") for n in os.listdir(out))


class FillingDisk:
    """A file on a disk with `room` bytes left: the write that does not fit is cut there and raises ENOSPC."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    """A full disk while a checkpoint is written: /dev/full as the temporary file (the kernel's ENOSPC at the
    first write), then a disk with 30 kB left (torch's zip writer then hides the ENOSPC behind a RuntimeError
    'unexpected pos', as on a real disk; torch.save(path) raised only that, with a traceback, and left the
    temporary file behind); and a JSON file. One error naming the file, the previous file intact, no *.tmp."""
    import addt_common
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, str(path))

    def dev_full():
        os.symlink("/dev/full", f"{path}.{os.getpid()}.tmp")

    def filling():  # torch_save's open
        monkeypatch.setattr(addt_common, "open", lambda p, mode="r": FillingDisk(open(p, mode), 30000), raising=False)

    big = {"a": torch.zeros(10 ** 5)}
    for full, write in ((dev_full, lambda: atomic_save(big, str(path))), (filling, lambda: atomic_save(big, str(path))),
                        (dev_full, lambda: addt_common.write_json(str(path), {"a": 2}))):
        full()
        with pytest.raises(UserError, match="ckpt.pt: no space left on the device; the previous file is intact$"):
            write()
        monkeypatch.undo()
        assert torch.load(path, weights_only=True) == {"a": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_exported_weights_have_normal_modes(inputs, tmp_path):
    old = os.umask(0o022)
    try:
        train_addt.main(addt_flags(inputs, tmp_path, "--max-steps", "1", "--perturb", "none"))
    finally:
        os.umask(old)
    for root, _, files in os.walk(tmp_path / "ema"):
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o644, f
    assert os.stat(tmp_path / "ckpt.pt").st_mode & 0o777 == 0o644


def test_purify_and_bench_refuse_to_replace_results(inputs, tmp_path):
    argv = ["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"], "--n", "2",
            "--nfe", "5", "--device", "cpu", "--grid", "0", "--out", str(tmp_path)]
    purify.main(argv)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(UserError, match="results.json exists: pass --overwrite"):
        purify.main(argv)
    assert (tmp_path / "results.json").read_text() == before
    purify.main(argv + ["--overwrite"])
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(UserError, match="bench.json exists: pass --overwrite"):
        bench.main(["--small", "--only", "rbgm", "--out", str(tmp_path / "bench.json")])


def test_cut_log_line_is_repaired_by_one_resume(inputs, tmp_path):
    """A kill in the middle of a log row: --resume drops the cut row (no JSONDecodeError) and continues."""
    more = ("--max-steps", "4", "--ckpt-every", "2", "--log-every", "1", "--perturb", "none")
    train_addt.main(addt_flags(inputs, tmp_path / "whole", *more))
    parts = tmp_path / "parts"
    train_addt.main(addt_flags(inputs, parts, *more[:1], "2", *more[2:]))  # the first 2 steps, as a killed run left
    with open(parts / "log.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')  # the row of step 3, cut
    train_addt.main(addt_flags(inputs, parts, *more, "--resume", "--extend"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(str(parts / "log.jsonl"))) == strip(read_jsonl(str(tmp_path / "whole" / "log.jsonl")))


def test_interrupted_ema_export_is_redone_on_resume(inputs, tmp_path, monkeypatch):
    """Killed while replacing OUT/ema after the last step: the resume re-exports the final EMA (identical to an
    uninterrupted run's) before it says done."""
    more = ("--max-steps", "2", "--ckpt-every", "1", "--perturb", "none")
    train_addt.main(addt_flags(inputs, tmp_path / "whole", *more))
    real, calls = train_addt.export_ema, []

    def die_on_last_export(args, ema, out):
        calls.append(1)
        if len(calls) == 2:  # the final export: the temporary folder is half written, then the process dies
            os.makedirs(os.path.join(out, "ema.tmp", "unet"), exist_ok=True)
            raise KeyboardInterrupt
        real(args, ema, out)

    monkeypatch.setattr(train_addt, "export_ema", die_on_last_export)
    with pytest.raises(KeyboardInterrupt):
        train_addt.main(addt_flags(inputs, tmp_path / "parts", *more))
    monkeypatch.setattr(train_addt, "export_ema", real)
    unlock_out(str(tmp_path / "parts"))  # what the end of the killed process does
    stale = load_unet(str(tmp_path / "parts" / "ema")).state_dict()  # step 1's export
    train_addt.main(addt_flags(inputs, tmp_path / "parts", *more, "--resume"))
    a, b = (load_unet(str(tmp_path / p / "ema")).state_dict() for p in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], stale[k]) for k in a)
    assert not os.path.exists(tmp_path / "parts" / "ema.tmp")


# ---------------------------------------------------------------- 5. resume means the same run

def test_training_resume_refuses_changed_flags(inputs, tmp_path):
    train_addt.main(addt_flags(inputs, tmp_path / "a", "--max-steps", "1", "--perturb", "none"))
    with pytest.raises(UserError, match=r"--lr 0.0002 -> 0.001.*--seed 0 -> 1"):
        train_addt.main(addt_flags(inputs, tmp_path / "a", "--max-steps", "1", "--perturb", "none", "--resume",
                                   "--lr", "1e-3", "--seed", "1"))
    with pytest.raises(UserError, match=r"--max-steps 1 -> 2"):
        train_addt.main(addt_flags(inputs, tmp_path / "a", "--max-steps", "2", "--perturb", "none", "--resume"))
    train_classifier.main(clf_flags(inputs, tmp_path / "c", "--epochs", "1"))
    with pytest.raises(UserError, match=r"--global-batch 20 -> 10"):
        train_classifier.main(clf_flags(inputs, tmp_path / "c", "--epochs", "1", "--resume", "--global-batch", "10"))
    with pytest.raises(UserError, match=r"--epochs 1 -> 2\).*--extend"):
        train_classifier.main(clf_flags(inputs, tmp_path / "c", "--epochs", "2", "--resume"))


def test_extend_recomputes_the_cosine_for_the_new_length(inputs, tmp_path):
    train_classifier.main(clf_flags(inputs, tmp_path, "--epochs", "2", "--lr", "0.1"))
    res = train_classifier.main(clf_flags(inputs, tmp_path, "--epochs", "4", "--lr", "0.1", "--resume", "--extend"))
    lrs = [h["lr"] for h in res["history"]]
    cos = train_classifier.cosine_lr
    assert lrs == pytest.approx([cos(0.1, 0, 2), cos(0.1, 1, 2), cos(0.1, 2, 4), cos(0.1, 3, 4)])
    assert lrs[2] == pytest.approx(0.05) and lrs[2] > 0  # continued on the longer curve, not restarted at 0.1


def test_log_rows_after_resume_equal_when_log_every_does_not_divide_ckpt_every(inputs, tmp_path, killed_at):
    more = ("--max-steps", "6", "--ckpt-every", "2", "--log-every", "3", "--perturb", "none")
    train_addt.main(addt_flags(inputs, tmp_path / "whole", *more))
    restore = killed_at(train_addt, "train_step", 5)
    with pytest.raises(KeyboardInterrupt):
        train_addt.main(addt_flags(inputs, tmp_path / "parts", *more))
    restore()
    train_addt.main(addt_flags(inputs, tmp_path / "parts", *more, "--resume"))  # from step 4: 1 step of the window
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    a, b = (strip(read_jsonl(str(tmp_path / p / "log.jsonl"))) for p in ("whole", "parts"))
    assert a == b and [r["step"] for r in a] == [3, 6]


def test_lock_is_per_folder_and_released(tmp_path):
    lock_out(str(tmp_path / "x"))
    lock_out(str(tmp_path / "x"))  # the same process may take it again
    unlock_out(str(tmp_path / "x"))
    assert (tmp_path / "x" / ".lock").read_text() == ""


# ---------------------------------------------------------------- 6. data a model was not made for (issue 17)

def image_zip(path, size, classes=10, per_class=1, seed=0):
    """An image folder zip, train/ and test/, `per_class` random size x size PNGs per class."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for c in range(classes):
                for k in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                    z.writestr(f"{split}/c{c}/{k}.png", buf.getvalue())
    return str(path)


def test_data_that_does_not_fit_the_models_is_refused_before_any_work(inputs, tmp_path):
    from models import build_classifier, classifier_checkpoint
    big, one, five = (image_zip(tmp_path / f"{n}.zip", s, c) for n, s, c in (("big", 64, 10), ("one", 1, 10),
                                                                               ("five", 32, 5)))
    base = ["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--n", "4", "--nfe", "5", "--device", "cpu",
            "--grid", "0"]
    for data, size in ((big, "64x64"), (one, "1x1")):
        t0 = time.time()
        with pytest.raises(UserError, match=f"holds {size} images, but the diffusion model .*unet takes 32x32"):
            purify.main(base + ["--data", data, "--out", str(tmp_path / f"p{size}")])
        assert time.time() - t0 < 10 and not os.path.exists(tmp_path / f"p{size}" / "results.json")
    with pytest.raises(UserError, match=r"classifier checkpoint .* has 10 classes, --data .*five.zip 5"):
        purify.main(base + ["--data", five, "--out", str(tmp_path / "p5")])
    with pytest.raises(UserError, match="holds 64x64 images, but the diffusion model"):
        train_addt.main(addt_flags(inputs, tmp_path / "t", "--max-steps", "1", "--data", big))
    # a classifier of ours records the size it was trained on: the bare classifier refuses other sizes too
    clf32 = tmp_path / "clf32.pt"
    torch.save(classifier_checkpoint(build_classifier("wrn-10-1", 10), "wrn-10-1", (32, 32)), clf32)
    with pytest.raises(UserError, match=r"big.zip holds 64x64 images, but classifier checkpoint .*clf32.pt takes 32"):
        attack.main(["--defense", "none", "--classifier", str(clf32), "--data", big, "--n", "2", "--device", "cpu",
                     "--out", str(tmp_path / "a")])
    assert not os.path.exists(tmp_path / "a" / "records-0.jsonl")


def test_labels_outside_the_classes_are_refused(tmp_path):
    """A CIFAR batch's labels come from the file: one beyond the class names is refused at load, not a
    traceback in the loss later."""
    import numpy as np
    from test_data import make_cifar10, write_pickle
    d, _ = make_cifar10(str(tmp_path), np.random.default_rng(0))
    x = np.zeros((3, 3072), np.uint8)
    write_pickle(os.path.join(d, "test_batch"), {b"labels": [1, 12, 3], b"data": x})
    with pytest.raises(UserError, match=r"\(test\): image 1 has label 12, but the data set names 10 classes"):
        load_split(d, "test")
    assert load_split(d, "train").labels.max() < 10


def test_train_classifier_records_the_image_size_and_defaults_to_fp32(inputs, tmp_path):
    assert train_classifier.parse_args(["--out", str(tmp_path)]).precision == "fp32"  # every default is fp32
    train_classifier.main(clf_flags(inputs, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "1"))
    ckpt = torch.load(tmp_path / "classifier.pt", weights_only=True)
    assert ckpt["image_size"] == [32, 32] and load_classifier(str(tmp_path / "classifier.pt")).input_size == (32, 32)


# ---------------------------------------------------------------- 7. flags that would be ignored are refused

NOT_APPLYING = [
    ("purify.py", ["--defense", "ddim", "--sampler", "ddpm"], "--sampler ddpm contradicts --defense ddim"),
    ("purify.py", ["--vpsde", "x"], "--vpsde applies to --defense vpsde, not ddpm"),
    ("purify.py", ["--defense", "edm", "--ddpm", "x"], "--ddpm applies to --defense ddpm / ddim / gdmp, not edm"),
    ("attack.py", ["--defense", "none", "--ddpm", "x"], "--ddpm applies to --defense ddpm / ddim / gdmp, not none"),
    ("train_addt.py", ["--linf-eps", "0.1"], "--linf-eps: for --perturb linf only, not rbgm"),
    ("train_addt.py", ["--perturb", "rbgm", "--linf-step", "0.01"], "--linf-step: for --perturb linf only"),
    ("train_addt.py", ["--perturb", "none", "--cgpo-iters", "2"], "--cgpo-iters: for CGPO's perturbation only"),
    ("train_addt.py", ["--perturb", "none", "--lambda-unit", "0.1"], "--lambda-unit: for CGPO's perturbation only"),
    ("train_addt.py", ["--vpsde", "x"], "--vpsde is the model of --model vpsde, not ddpm"),
]


@pytest.mark.parametrize("script,bad,match", NOT_APPLYING, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_flags_that_do_not_apply_are_refused(script, bad, match):
    module = __import__(script[:-3])
    extra = ["--classifier", "x.pt", "--ddpm", "x"] if script == "train_addt.py" else []
    with pytest.raises(UserError, match=match):
        module.parse_args([*extra, *bad])


def test_flags_that_apply_still_work():
    assert purify.parse_args(["--sampler", "ddim"]).defense == "ddim"
    assert purify.parse_args(["--defense", "ddim", "--sampler", "ddim"]).defense == "ddim"
    assert purify.parse_args([]).defense == "ddpm"
    a = train_addt.parse_args(["--classifier", "x", "--ddpm", "x", "--perturb", "linf", "--linf-eps", "0.1"])
    assert (a.linf_eps, a.linf_step, a.cgpo_iters, a.guidance) == (0.1, 4 / 255, 5, "ce")
    a = train_addt.parse_args(["--classifier", "x", "--ddpm", "x"])
    assert (a.linf_eps, a.linf_step) == (8 / 255, 4 / 255)  # filled, so args.json and resume checks keep them


def test_quick_and_tables_flags(tmp_path, inputs):
    import quick
    import tables
    with pytest.raises(UserError, match="--n must be positive"):
        quick.parse_args(["--n", "0", "--out", str(tmp_path / "q")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        quick.parse_args(["--out", str(tmp_path / "file")])
    argv = ["--table", "4", "--classifier", inputs["classifier"], "--ddpm", inputs["ddpm"], "--out", str(tmp_path)]
    assert tables.parse_args(argv + ["--extra-args", "--random-start"]).extra == ["--random-start"]
    assert tables.parse_args(argv + ["--extra-args=--protocol worst-5"]).extra == ["--protocol", "worst-5"]


# ---------------------------------------------------------------- 8. records of two attacks are never mixed

def attack_flags(inputs, out, *more):
    return ["--setting", "dw-both", "--steps", "1", "--nfe", "5", "--n", "2", "--batch-size", "1", "--chunk", "2",
            "--device", "cpu", "--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"],
            "--save-adv", "pt", "--out", str(out), *more]


@pytest.fixture(scope="module")
def finished_attack(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "whole"
    attack.main(attack_flags(inputs, out))
    return out


def test_records_of_another_attack_are_never_mixed_in(inputs, tmp_path, finished_attack, killed_at):
    out = tmp_path / "run"
    restore = killed_at(attack, "append_jsonl", 2)  # killed before the second image's record
    with pytest.raises(KeyboardInterrupt):
        attack.main(attack_flags(inputs, out))
    restore()
    before = (out / "records-0.jsonl").read_text()
    no_save = [a for a in attack_flags(inputs, out) if a not in ("--save-adv", "pt")]
    with pytest.raises(UserError, match=r"--resume with other settings .*\(--save-adv\)"):
        attack.main(no_save + ["--resume"])  # image 0's deltas were saved: image 1's must be too
    os.remove(out / "args.json")  # lost (the summary was never written): the records' fingerprints decide
    with pytest.raises(UserError, match=r"holds the records of 1 attacked images .*pass --resume"):
        attack.main(attack_flags(inputs, out, "--eps", "0.02"))
    for argv in (attack_flags(inputs, out, "--resume", "--eps", "0.02"), no_save + ["--resume"]):
        with pytest.raises(UserError, match="their fingerprint differs"):
            attack.main(argv)
    assert (out / "records-0.jsonl").read_text() == before
    s = attack.main(attack_flags(inputs, out, "--resume"))
    assert attack.read_records(str(out)) == attack.read_records(str(finished_attack)) and s["n"] == 2


def test_nan_records_and_summaries_are_refused(inputs, tmp_path, finished_attack):
    import shutil

    import analyze
    run = tmp_path / "runs" / "a"
    shutil.copytree(finished_attack, run)
    os.remove(run / ".lock")
    analyze.main(["settings", str(tmp_path / "runs"), "--no-plot", "--out", str(tmp_path / "ok")])  # finite: drawn
    summary = json.load(open(run / "summary.json"))
    json.dump({**summary, "robust_accuracy": float("nan")}, open(run / "summary.json", "w"))
    with pytest.raises(UserError, match=r"summary.json holds a number that is not finite \(robust nan"):
        analyze.main(["settings", str(tmp_path / "runs"), "--no-plot", "--out", str(tmp_path / "nan")])
    rows = read_jsonl(str(run / "records-0.jsonl"))
    rows[1]["loss"] = float("nan")
    (run / "records-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.remove(run / "summary.json")
    with pytest.raises(UserError, match=r"records-0.jsonl: the record of image 1 holds loss = nan"):
        attack.main(attack_flags(inputs, run, "--resume"))
    assert not (run / "summary.json").exists()


# ---------------------------------------------------------------- 9. a full disk: one line, nothing lost, clean resume

def full_disk_at(monkeypatch, calls):
    """From now on, the k-th torch_save (k in calls) writes into /dev/full: a real ENOSPC from the kernel
    through torch's own writer."""
    import addt_common
    real, count = addt_common.torch_save, []

    def save(obj, path):
        count.append(1)
        if len(count) in calls:
            os.symlink("/dev/full", path)
        real(obj, path)
    monkeypatch.setattr(addt_common, "torch_save", save)


def no_tmp_left(folder):
    return not [f for _, ds, fs in os.walk(folder) for f in ds + fs if f.endswith(".tmp")]


def test_full_disk_during_an_attack(inputs, tmp_path, finished_attack, monkeypatch):
    """The disk fills while the second image's deltas are saved, then while its record is appended (the
    write cut half-way): each time one error naming the file, nothing half-written kept, and --resume
    gives the uninterrupted run's records and deltas."""
    out = tmp_path / "run"
    full_disk_at(monkeypatch, {2})
    with pytest.raises(UserError, match=r"could not write .*adv/0-000001.pt: no space left on the device$"):
        attack.main(attack_flags(inputs, out))
    monkeypatch.undo()
    records = out / "records-0.jsonl"
    assert os.listdir(out / "adv") == ["0-000000.pt"] and len(read_jsonl(str(records))) == 1 and no_tmp_left(out)
    before, real_write = records.read_bytes(), os.write

    def cut_write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("records-0.jsonl"):
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", cut_write)
    with pytest.raises(UserError, match=r"could not append to .*records-0.jsonl: no space left on the device; its "
                                        "earlier lines are intact"):
        attack.main(attack_flags(inputs, out, "--resume"))
    monkeypatch.undo()
    assert records.read_bytes() == before
    attack.main(attack_flags(inputs, out, "--resume"))
    assert attack.read_records(str(out)) == attack.read_records(str(finished_attack)) and no_tmp_left(out)
    for name in ("0-000000.pt", "0-000001.pt"):
        a, b = (torch.load(p / "adv" / name, weights_only=True) for p in (out, finished_attack))
        assert torch.equal(a["delta"], b["delta"])


def test_full_disk_while_training_keeps_the_last_checkpoint(inputs, tmp_path, monkeypatch):
    """ckpt.pt of both training scripts and OUT/ema: a real ENOSPC at the second write; the error names the
    file, the previous one is intact, no temporary file stays and --resume ends as an uninterrupted run."""
    from models.unet import UNet
    more = ("--epochs", "2", "--max-steps-per-epoch", "1")
    train_classifier.main(clf_flags(inputs, tmp_path / "c-whole", *more))
    full_disk_at(monkeypatch, {2})
    with pytest.raises(UserError, match=r"could not write .*c-parts/ckpt.pt: no space left on the device; the "
                                        "previous file is intact"):
        train_classifier.main(clf_flags(inputs, tmp_path / "c-parts", *more))
    monkeypatch.undo()
    assert torch.load(tmp_path / "c-parts" / "ckpt.pt", weights_only=True)["epoch"] == 1
    assert no_tmp_left(tmp_path / "c-parts")
    train_classifier.main(clf_flags(inputs, tmp_path / "c-parts", *more, "--resume"))
    a, b = (torch.load(tmp_path / p / "classifier.pt", weights_only=True)["model"] for p in ("c-whole", "c-parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    more = ("--max-steps", "2", "--ckpt-every", "1", "--perturb", "none")
    train_addt.main(addt_flags(inputs, tmp_path / "a-whole", *more))
    parts = tmp_path / "a-parts"
    full_disk_at(monkeypatch, {2})
    with pytest.raises(UserError, match=r"could not write .*a-parts/ckpt.pt: no space left on the device; the "
                                        "previous file is intact"):
        train_addt.main(addt_flags(inputs, parts, *more))
    monkeypatch.undo()
    assert torch.load(parts / "ckpt.pt", weights_only=True)["step"] == 1 and no_tmp_left(parts)
    step1 = load_unet(str(parts / "ema")).state_dict()
    real = UNet.save_pretrained

    def full_export(self, path):  # the weights' temporary file is /dev/full
        os.makedirs(path, exist_ok=True)
        os.symlink("/dev/full", os.path.join(path, "diffusion_pytorch_model.safetensors.tmp"))
        real(self, path)
    monkeypatch.setattr(UNet, "save_pretrained", full_export)
    with pytest.raises(UserError, match=r"could not write .*a-parts/ema: no space left on the device; the previous "
                                        "export is intact"):
        train_addt.main(addt_flags(inputs, parts, *more, "--resume"))  # step 2 trained and saved, its export fails
    monkeypatch.undo()
    kept = load_unet(str(parts / "ema")).state_dict()
    assert all(torch.equal(kept[k], step1[k]) for k in kept) and no_tmp_left(parts)
    train_addt.main(addt_flags(inputs, parts, *more, "--resume"))  # nothing left to train: the export is redone
    a, b = (load_unet(str(tmp_path / p / "ema")).state_dict() for p in ("a-whole", "a-parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 10. bad checkpoints: one line, never torch's advice

def test_resumed_training_checkpoints_with_nan_are_refused(inputs, tmp_path):
    train_classifier.main(clf_flags(inputs, tmp_path / "c", "--epochs", "1", "--max-steps-per-epoch", "1"))
    good = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    for part, key in (("model", "fc.weight"), ("optimizer", "state")):
        ckpt = copy.deepcopy(good)
        if part == "model":
            ckpt["model"][key][0, 0] = float("nan")
        else:  # SGD's momentum buffer of the first parameter
            ckpt["optimizer"]["state"][0]["momentum_buffer"].view(-1)[0] = float("inf")
        torch.save(ckpt, tmp_path / "c" / "ckpt.pt")
        name = "model.fc.weight" if part == "model" else "optimizer.state.0.momentum_buffer"
        with pytest.raises(UserError, match=f"ckpt.pt holds non-finite weights \\(NaN or inf in {name}\\)"):
            train_classifier.main(clf_flags(inputs, tmp_path / "c", "--epochs", "2", "--max-steps-per-epoch", "1",
                                            "--resume", "--extend"))
    torch.save(good, tmp_path / "c" / "ckpt.pt")
    train_addt.main(addt_flags(inputs, tmp_path / "a", "--max-steps", "1", "--perturb", "none"))
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    ckpt["ema"]["model"]["conv_out.bias"][0] = float("nan")
    torch.save(ckpt, tmp_path / "a" / "ckpt.pt")
    with pytest.raises(UserError, match=r"holds non-finite weights \(NaN or inf in ema.model.conv_out.bias\)"):
        train_addt.main(addt_flags(inputs, tmp_path / "a", "--max-steps", "2", "--perturb", "none", "--resume",
                                   "--extend"))


def test_classifier_checkpoints_with_bad_fields_or_bytes(inputs, tmp_path):
    good = torch.load(inputs["classifier"], weights_only=True)
    for key, value, want in (("num_classes", "10", "a positive integer"), ("num_classes", 10.5, "a positive integer"),
                             ("num_classes", True, "a positive integer"), ("arch", 3, "an architecture name"),
                             ("std", [0.2, 0.0, 0.2], "three finite numbers above 0"),
                             ("image_size", [32], r"\[height, width\]")):
        torch.save({**good, key: value}, tmp_path / "c.pt")
        with pytest.raises(UserError, match=f"{key} is {value!r}, not {want}".replace("[", r"\[").replace("]", r"\]")
                           if key != "image_size" else want):
            load_classifier(str(tmp_path / "c.pt"))
    from addt_common import load_checkpoint
    rng = torch.Generator().manual_seed(0)
    for head in (b"", b"\x80\x04", b"PK\x03\x04"):  # random bytes, behind no header, a pickle's or a zip's
        (tmp_path / "r.pt").write_bytes(head + bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8)))
        for load in (lambda p: load_classifier(p), lambda p: load_checkpoint(p, "checkpoint")):
            with pytest.raises(UserError) as e:
                load(str(tmp_path / "r.pt"))
            assert "weights_only" not in str(e.value) and "r.pt" in str(e.value), str(e.value)
            assert ("not a checkpoint" if not head else "pickle" if head == b"\x80\x04" else "zip") in str(e.value)


def test_torchrun_flag_error_is_one_line(tmp_path, torchrun):
    """Every rank meets the same flag error before the process group exists: rank 0 prints it, and all
    exit 0, since torchrun answers any other exit status with its own failure banner and traceback."""
    proc = torchrun("attack.py", "--eps", "nan", "--out", tmp_path / "o", timeout=120)
    assert proc.stderr.strip().splitlines() == ["error: --eps must lie in [0, inf), not nan"], proc.stderr
    assert proc.returncode == 0 and proc.stdout == "" and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 11. DiffPure reads our VP-SDE export

class ScoreSdeEMA:
    """score_sde's models/ema.ExponentialMovingAverage, the part restore_checkpoint and DiffPure use."""

    def __init__(self, parameters, decay):
        self.decay, self.num_updates = decay, 0
        self.shadow_params = [p.clone().detach() for p in parameters if p.requires_grad]

    def load_state_dict(self, state):
        self.decay, self.num_updates, self.shadow_params = state["decay"], state["num_updates"], state["shadow_params"]

    def copy_to(self, parameters):
        for s, p in zip(self.shadow_params, [p for p in parameters if p.requires_grad]):
            p.data.copy_(s.data)


def test_diffpure_restores_the_vpsde_export(tmp_path):
    """score_sde's restore_checkpoint (DiffPure's runners/diffpure_sde.py calls it) on save_diffusion_model's
    export: optimizer.load_state_dict (Adam over the model's parameters), model.load_state_dict(strict=False),
    ema.load_state_dict, step; then DiffPure's ema.copy_to gives exactly the exported weights, for DiffPure's
    bare model and score_sde's DataParallel one. The layout is that of a real score_sde checkpoint."""
    from addt_diffusion import new_diffusion_model, save_diffusion_model
    from models import safe_pickle
    from test_vpsde import shared
    torch.manual_seed(0)
    trained = new_diffusion_model("vpsde", attack.TINY_VPSDE_CONFIG)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_diffusion_model("vpsde", trained, str(tmp_path), step=7)
    loaded_state = torch.load(tmp_path / "checkpoint.pth", map_location="cpu")
    real = safe_pickle.load(shared("checkpoint_8.pth"))
    assert set(loaded_state) == set(real) and set(loaded_state["ema"]) == set(real["ema"])
    # Adam's settings as this torch names them (the fixture's newer torch may know more, e.g. 2.6's
    # decoupled_weight_decay, which torch 2.4's Adam neither writes nor needs)
    ours = set(torch.optim.Adam([torch.zeros(1, requires_grad=True)]).state_dict()["param_groups"][0])
    assert set(loaded_state["optimizer"]["param_groups"][0]) == set(real["optimizer"]["param_groups"][0]) & ours
    for wrap in (lambda m: m, torch.nn.DataParallel):
        torch.manual_seed(1)
        model = wrap(new_diffusion_model("vpsde", attack.TINY_VPSDE_CONFIG))
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
        ema = ScoreSdeEMA(model.parameters(), decay=0.9999)
        state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
        state["optimizer"].load_state_dict(loaded_state["optimizer"])
        state["model"].load_state_dict(loaded_state["model"], strict=False)
        state["ema"].load_state_dict(loaded_state["ema"])
        state["step"] = loaded_state["step"]
        ema.copy_to(model.parameters())
        want, got = trained.state_dict(), getattr(model, "module", model).state_dict()
        assert state["step"] == 7 and ema.num_updates == 7 and all(torch.equal(want[k], got[k]) for k in want)
        assert optimizer.param_groups[0]["lr"] == 2e-4
