"""What happens when things go wrong (issue "Reliability"): no number computed from NaN, one `error:`
line (exit 2, no traceback) for every user mistake before any expensive work, nothing lost or silently
replaced (locks, atomic writes, exact and checked resume). The attack's own cases are in test_attack.py."""
import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import bench
import purify
import train_addt
import train_classifier
from addt_common import UserError, atomic_save, lock_out, read_jsonl, unlock_out
from addt_diffusion import load_unet

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
    return ["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"], "--out", str(out),
            "--device", "cpu", "--global-batch", "4", "--cgpo-iters", "1", *more]


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


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, str(path))

    def full(obj, f):
        open(f, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="no space left on the device; the previous file is intact"):
        atomic_save({"a": 2}, str(path))
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
