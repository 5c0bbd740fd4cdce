"""ADDT fine-tuning (train_addt.py, SPEC.md "ADDT fine-tuning"): the noise mixture and lambda_t against
numbers computed by hand, CGPO (gradients w.r.t. delta only, and it does raise the classifier's loss),
short training runs of every variant, exact resume, torchrun, NaN handling, the EMA and the errors.
All on the tiny UNet and classifier of attack.make_smoke_inputs, on the CPU."""
import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import purify
import train_addt
from addt_common import UserError
from addt_data import load_split, to_float
from addt_diffusion import linear_alpha_bar, load_unet
from models import load_classifier
from train_addt import DDPM, EMA, cgpo, mix_noise, noisy, x0_estimate
from train_addt import lambda_t as lambda_as

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("images_per_s",)  # the only log entries that may differ between runs


@pytest.fixture(scope="module")
def inputs(smoke_inputs):
    return smoke_inputs


@pytest.fixture(scope="module")
def batch(inputs):
    """8 training images in [-1, 1], one per class for the first 8 classes, and their labels."""
    data = load_split(inputs["data"], "train")
    idx = torch.arange(8)  # image folders are class-interleaved: image k is of class k % 10
    assert data.labels[idx].tolist() == list(range(8))
    return 2 * to_float(data.images[idx]) - 1, data.labels[idx]


def flags(inputs, out, *more, classifier=True):
    return ["--ddpm", inputs["ddpm"], "--data", inputs["data"], "--out", str(out), "--device", "cpu",
            "--global-batch", "4", *(["--classifier", inputs["classifier"]] if classifier else []), *more]


def alpha_bar64():
    """SPEC.md's schedule, independently of addt_diffusion.py: betas 1e-4 .. 0.02 over 1000 steps, float64."""
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


# ---------------------------------------------------------------- lambda_t and the noise mixture

def lambda_t(ab, *bounds):
    """eq. 7 for DDPM: a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)."""
    return lambda_as(ab.sqrt(), (1 - ab).sqrt(), *bounds)


def scales(ab):
    return ab.sqrt(), (1 - ab).sqrt()


TS = [0, 20, 100, 500, 999]
# 0.03 sqrt(ab) / sqrt(1 - ab), clipped to [0, 0.3]: the clip is active up to t = 26
# (t = 0: 2.99985 -> 0.3, t = 20: 0.377843 -> 0.3)
LAMBDA_RBGM = [0.3, 0.3, 0.0876527388, 0.00871341463, 0.000190588389]
# sqrt(ab) / sqrt(1 - ab), clipped to [0, 10] (ADDT_linf; t = 0: 99.995 -> 10, t = 20: 12.59 -> 10)
LAMBDA_LINF = [10.0, 10.0, 2.92175796, 0.290447154, 0.00635294629]


def test_alpha_bar_and_lambda_by_hand():
    ab64 = alpha_bar64()
    ab = linear_alpha_bar()
    np.testing.assert_allclose(ab.double().numpy(), ab64, rtol=2e-5)
    for t, want in zip(TS, LAMBDA_RBGM):
        assert min(0.03 * math.sqrt(ab64[t] / (1 - ab64[t])), 0.3) == pytest.approx(want, rel=1e-8)
    t = torch.tensor(TS)
    torch.testing.assert_close(lambda_t(ab[t]), torch.tensor(LAMBDA_RBGM), rtol=1e-4, atol=0)
    torch.testing.assert_close(lambda_t(torch.from_numpy(ab64)[t]), torch.tensor(LAMBDA_RBGM, dtype=torch.float64),
                               rtol=1e-8, atol=0)


def test_lambda_defaults_per_variant(inputs):
    ab = linear_alpha_bar()[torch.tensor(TS)]
    base = ["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"]]
    for perturb, defaults, want in (("rbgm", (0.03, 0.0, 0.3), LAMBDA_RBGM), ("linf", (1.0, 0.0, 10.0), LAMBDA_LINF),
                                    ("none", (0.0, 0.0, 0.0), [0.0] * 5)):
        args = train_addt.parse_args(base + ["--perturb", perturb])
        assert (args.lambda_unit, args.lambda_min, args.lambda_max) == defaults
        lam = lambda_t(ab, args.lambda_unit, args.lambda_min, args.lambda_max)
        torch.testing.assert_close(lam, torch.tensor(want), rtol=1e-4, atol=0)
    assert train_addt.parse_args(["--init", "scratch"]).perturb == "none"  # plain DDPM training
    args = train_addt.parse_args(base + ["--lambda-unit", "0.1", "--lambda-min", "0.01", "--lambda-max", "0.5"])
    torch.testing.assert_close(lambda_t(ab, args.lambda_unit, args.lambda_min, args.lambda_max),
                               torch.tensor([0.5, 0.5, 0.292175796, 0.0290447154, 0.01]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("perturb", ["rbgm", "linf"])
def test_noise_mixture_by_hand(perturb):
    """eq. 6 and eq. 4 element by element with math.sqrt, for five t in float64."""
    ab64 = alpha_bar64()
    g = torch.Generator().manual_seed(0)
    x0, eps, delta = (torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    ab = torch.from_numpy(ab64[TS])
    lam = lambda_t(ab, *((1.0, 0.0, 10.0) if perturb == "linf" else (0.03, 0.0, 0.3)))
    eps_mix = mix_noise(eps, delta, lam, perturb)
    x_t = noisy(x0, eps_mix, *scales(ab))
    for i in range(5):
        l_, a = (LAMBDA_LINF if perturb == "linf" else LAMBDA_RBGM)[i], ab64[TS[i]]
        for j in (0, 7, 11):  # a few elements of the flattened (3, 2, 2) sample
            e, d, x = eps[i].flatten()[j].item(), delta[i].flatten()[j].item(), x0[i].flatten()[j].item()
            e_mix = e + l_ * d if perturb == "linf" else math.sqrt(1 - l_ ** 2) * e + l_ * d
            assert eps_mix[i].flatten()[j].item() == pytest.approx(e_mix, rel=1e-7, abs=1e-9)
            want_x_t = math.sqrt(a) * x + math.sqrt(1 - a) * e_mix
            assert x_t[i].flatten()[j].item() == pytest.approx(want_x_t, rel=1e-7, abs=1e-9)
            assert x0_estimate(x_t, torch.zeros_like(x_t), *scales(ab))[i].flatten()[j].item() == pytest.approx(
                want_x_t / math.sqrt(a), rel=1e-9)
    # the estimate with the true mixed noise is x0 itself (eq. 4 inverts eq. 2)
    torch.testing.assert_close(x0_estimate(x_t, eps_mix, *scales(ab)), x0, rtol=0, atol=1e-9)
    # lambda = 0 is plain DDPM noise
    torch.testing.assert_close(mix_noise(eps, delta, torch.zeros(5, dtype=torch.float64), perturb), eps)


# ---------------------------------------------------------------- CGPO

def cgpo_args(inputs, *more):
    return train_addt.parse_args(["--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], *more])


@pytest.mark.parametrize("perturb,guidance", [("rbgm", "ce"), ("linf", "ce"), ("rbgm", "mse")])
def test_cgpo_takes_no_parameter_gradients(inputs, batch, perturb, guidance):
    x0, y = batch
    unet = load_unet(inputs["ddpm"]).train()  # as in training: parameters require grad
    classifier = load_classifier(inputs["classifier"])  # requires grad too, so a stray backward would show
    params = list(unet.parameters()) + list(classifier.parameters())
    assert all(p.requires_grad and p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    t = torch.tensor([0, 10, 30, 50, 100, 300, 600, 999])
    ab = linear_alpha_bar()[t]
    args = cgpo_args(inputs, "--perturb", perturb, "--guidance", guidance, "--cgpo-iters", "3")
    lam = lambda_t(ab, args.lambda_unit, args.lambda_min, args.lambda_max)
    delta, first, _ = cgpo(DDPM("cpu"), unet, classifier, x0, y, t, lam, args, torch.Generator().manual_seed(0),
                        contextlib.nullcontext)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and unet.training
    assert not delta.requires_grad and delta.shape == x0.shape and first.ndim == 0 and math.isfinite(first)
    if perturb == "rbgm":  # RBGM output: every (image, channel) row of 1024 is a (permuted) N(0, 1) sample
        rows = delta.flatten(2)
        assert rows.mean(2).abs().max() < 0.15 and (rows.std(2) - 1).abs().max() < 0.1 and rows.abs().max() < 6
        assert min(len(r.unique()) for r in rows.flatten(0, 1)) > 1000  # not a copy of the gradient's ties
    else:  # inside the 8/255 ball in model units (2 x image units), and x0 + delta stays an image
        assert delta.abs().max() <= 2 * 8 / 255 + 1e-6 and delta.abs().max() > 0
        assert (x0 + delta).abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("perturb", ["rbgm", "linf"])
def test_cgpo_raises_the_classifier_loss(inputs, batch, perturb):
    """Paired comparison on 8 fixed eps draws: CE of classifier((x0_hat + 1) / 2) with CGPO's final delta
    vs its starting delta (N(0, I) from the same seed for rbgm, zero for linf). The default lambdas are enough
    even through the untrained tiny UNet: x0_hat moves by lambda / gamma_t x delta, 0.03 delta for rbgm (delta
    itself for linf) where the clip is off, and the small t here keep the noise in x0_hat from drowning it."""
    x0, y = batch
    unet = load_unet(inputs["ddpm"]).train()
    classifier = load_classifier(inputs["classifier"]).requires_grad_(False)
    t = torch.tensor([10, 20, 30, 40, 50, 60, 80, 100])
    ab = linear_alpha_bar()[t]
    args = cgpo_args(inputs, "--perturb", perturb)
    lam = lambda_t(ab, args.lambda_unit, args.lambda_min, args.lambda_max)
    delta, _, _ = cgpo(DDPM("cpu"), unet, classifier, x0, y, t, lam, args, torch.Generator().manual_seed(0),
                    contextlib.nullcontext)
    # cgpo's first draw from its generator is the starting delta
    start = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)) if perturb == "rbgm" else 0 * x0

    @torch.no_grad()
    def ce(d):
        g, out = torch.Generator().manual_seed(123), []
        for _ in range(8):
            x_t = noisy(x0, mix_noise(torch.randn(x0.shape, generator=g), d, lam, perturb), *scales(ab))
            out.append(F.cross_entropy(classifier((x0_estimate(x_t, unet(x_t, t), *scales(ab)) + 1) / 2), y).item())
        return np.mean(out)

    ce_start, ce_end = ce(start), ce(delta)
    assert ce_end > 1.3 * ce_start, (ce_start, ce_end)  # measured 1.63 -> 3.03 (rbgm), 1.63 -> 7.7 (linf)


# ---------------------------------------------------------------- training runs

def eps_mse(unet, x0, seed=0):
    """The plain epsilon-MSE (eq. 3) on a fixed batch, t and noise, dropout off."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = linear_alpha_bar()[t]
    with torch.no_grad():
        return F.mse_loss(unet.eval()(noisy(x0, eps, *scales(ab)), t), eps).item()


@pytest.mark.parametrize("perturb,guidance", [("rbgm", "ce"), ("rbgm", "mse"), ("linf", "ce"), ("linf", "mse"),
                                              ("none", "ce")])
def test_training_lowers_the_loss(inputs, batch, tmp_path, perturb, guidance):
    x0 = torch.cat([batch[0], batch[0].flip(3)])  # the training images and their flips (the augmentation)
    loss0 = eps_mse(load_unet(inputs["ddpm"]), x0)
    # lr 10x the paper's: a dozen steps must move the untrained tiny UNet; mse guidance needs no classifier
    cgpo = ["--guidance", guidance, "--cgpo-iters", "2"] if perturb != "none" else []
    unet, ema = train_addt.main(flags(inputs, tmp_path, "--perturb", perturb, *cgpo,
                                      "--max-steps", "12", "--lr", "2e-3", "--log-every", "4",
                                      classifier=guidance == "ce"))
    loss1 = eps_mse(unet, x0)
    assert loss1 < 0.8 * loss0, (loss0, loss1)  # measured 1.08 -> 0.33 .. 0.35 for every variant
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [4, 8, 12] and all(math.isfinite(r["loss"]) for r in log)
    if perturb != "none":
        assert all(r["cgpo_before"] > 0 and r["cgpo_after"] > 0 for r in log)
    assert log[-1]["ema_decay"] == pytest.approx(1 - 12 ** -0.75)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 12 and ckpt["ema"]["step"] == 12
    assert json.load(open(tmp_path / "args.json"))["perturb"] == perturb
    exported = load_unet(str(tmp_path / "ema"))
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ema.model.state_dict()[k]), k


def test_scratch_init_is_seeded(inputs, tmp_path):
    """--init scratch takes the architecture from --ddpm's config.json, random weights keyed by --seed."""
    def run(name, seed):
        unet, _ = train_addt.main(flags(inputs, tmp_path / name, "--init", "scratch", "--seed", seed,
                                        "--max-steps", "1", classifier=False))
        return unet.state_dict()

    runs = [run("a", "1"), run("b", "1"), run("c", "2")]
    pretrained = load_unet(inputs["ddpm"]).state_dict()
    assert runs[0].keys() == pretrained.keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["conv_in.weight"], runs[2]["conv_in.weight"])
    assert not torch.equal(runs[0]["conv_in.weight"], pretrained["conv_in.weight"])
    with pytest.raises(UserError, match="no config.json there to take the architecture from"):
        train_addt.main(flags(inputs, tmp_path, "--init", "scratch", "--ddpm", str(tmp_path), classifier=False))


def test_resume_is_exact(inputs, tmp_path, killed_at):
    """6 steps in one go vs killed during step 5 (checkpoint at 3, log rows to 4) and resumed: dropout,
    flips, t, CGPO's draws and RBGM all replay, so every tensor is bit-identical, and the log holds each
    step once. Two micro-batches per step."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    more = ("--max-steps", "6", "--ckpt-every", "3", "--batch-size", "2", "--cgpo-iters", "2", "--log-every", "1")
    train_addt.main(flags(inputs, whole, *more))

    restore = killed_at(train_addt, "train_step", 5)
    with pytest.raises(KeyboardInterrupt):
        train_addt.main(flags(inputs, parts, *more))
    restore()
    assert torch.load(parts / "ckpt.pt", weights_only=True)["step"] == 3
    assert [json.loads(line)["step"] for line in open(parts / "log.jsonl")] == [1, 2, 3, 4]
    train_addt.main(flags(inputs, parts, *more, "--resume"))

    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (whole, parts))
    assert a["step"] == b["step"] == 6 and a["ema"]["step"] == b["ema"]["step"] == 6
    for sd_a, sd_b in ((a["model"], b["model"]), (a["ema"]["model"], b["ema"]["model"])):
        assert sd_a.keys() == sd_b.keys()
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), k
    assert not torch.equal(a["model"]["conv_out.weight"], a["ema"]["model"]["conv_out.weight"])
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    logs = [[{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(p / "log.jsonl")]
            for p in (whole, parts)]
    assert logs[0] == logs[1] and len(logs[0]) == 6


def test_torchrun_then_purify(inputs, tmp_path, torchrun):
    """Two gloo processes fine-tune, two micro-batches each per step (no_sync on the first);
    purify.py loads the exported EMA weights."""
    out = tmp_path / "addt"
    p = torchrun("train_addt.py", *flags(inputs, out, "--max-steps", "2", "--batch-size", "1", "--cgpo-iters", "2"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 steps of 4 (2 x 1 x 2)" in p.stdout and "done: 2 steps" in p.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    res = purify.main(["--ddpm", str(out / "ema"), "--classifier", inputs["classifier"], "--data", inputs["data"],
                       "--n", "8", "--nfe", "5", "--device", "cpu", "--grid", "0", "--out", str(tmp_path / "pur")])
    saved = json.load(open(tmp_path / "pur" / "results.json"))
    assert saved["timesteps"] == [100, 80, 60, 40, 20, 0] and saved["n"] == 8
    assert saved["args"]["ddpm"] == str(out / "ema")
    assert saved["purified_accuracy"] == res["purified_accuracy"] and 0 <= saved["purified_accuracy"] <= 100
    assert saved["classifier_accuracy"] > 50  # the smoke classifier on its own test split


RANKS_AGREE = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import train_addt
from addt_common import run_main


def main():  # train, then gather every rank's weights (inside run_main, before it ends the process group)
    unet, ema = train_addt.main(sys.argv[1:])
    mine = torch.stack([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (unet, ema.model)])
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    if dist.get_rank() == 0:
        torch.save(torch.stack(both), {out!r})


run_main(main)
"""


def test_torchrun_ranks_agree(inputs, tmp_path, torchrun):
    """Gradient averaging works with accumulation (no_sync on all but the last micro-batch): both ranks
    hold the same weights and EMA after the run, and these moved away from the start."""
    script, gathered = tmp_path / "ranks_agree.py", tmp_path / "weights.pt"
    script.write_text(RANKS_AGREE.format(repo=REPO, out=str(gathered)))
    p = torchrun(script, *flags(inputs, tmp_path / "addt", "--max-steps", "2", "--batch-size", "1", "--cgpo-iters", "1"))
    assert p.returncode == 0, p.stdout + p.stderr
    w = torch.load(gathered, weights_only=True)  # (rank, online / EMA, parameters)
    assert torch.equal(w[0], w[1])
    start = torch.cat([p.detach().flatten() for p in load_unet(inputs["ddpm"]).parameters()])
    assert not torch.equal(w[0, 0], start) and not torch.equal(w[0, 1], start)


def test_nonfinite_loss_stops_with_the_step_saved(inputs, tmp_path, monkeypatch):
    """The third step's mixed noise is NaN: the run stops at step 3 and saves the weights before that update."""
    calls = []
    real_mix = train_addt.mix_noise

    def nan_on_third_step(eps, delta, lam, perturb="rbgm"):
        calls.append(1)  # --perturb none: one call per step, no CGPO
        out = real_mix(eps, delta, lam, perturb)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(train_addt, "mix_noise", nan_on_third_step)
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 3 .*nonfinite-step3\.pt"):
        train_addt.main(flags(inputs, tmp_path, "--perturb", "none", "--max-steps", "5", "--ckpt-every", "1"))
    bad = torch.load(tmp_path / "nonfinite-step3.pt", weights_only=True)
    good = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # written after step 2
    assert bad["step"] == 3 and good["step"] == 2 and bad["ema"]["step"] == 2
    for k, v in good["model"].items():  # the NaN step changed nothing
        assert torch.equal(bad["model"][k], v) and torch.isfinite(v).all(), k
        assert torch.equal(bad["ema"]["model"][k], good["ema"]["model"][k]), k


# ---------------------------------------------------------------- EMA

def test_ema_matches_diffusers():
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = EMA(model)  # defaults: inv_gamma 1, power 0.75, max decay 0.9999
    ref = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        gap = [(e - p).abs().sum() for e, p in zip(ema.model.parameters(), model.parameters())]
        ema.update(model)
        ref.step(model.parameters())
        want = 0.0 if step == 1 else 1 - step ** -0.75  # 1 - (1 + s)^-0.75 with s = step - 1
        assert ema.decay() == pytest.approx(want, abs=1e-12) and ref.cur_decay_value == pytest.approx(want)
        for e, r, p, g in zip(ema.model.parameters(), ref.shadow_params, model.parameters(), gap):
            torch.testing.assert_close(e, r, rtol=1e-6, atol=1e-6)
            # EMA moves toward the weights: the gap shrinks by exactly the decay
            torch.testing.assert_close((e - p).abs().sum(), want * g, rtol=1e-5, atol=1e-6)
    assert ema.step == 5
    assert EMA(model, max_decay=0.5).decay() == 0.0
    capped = EMA(model, max_decay=0.5)
    capped.step = 3
    assert capped.decay() == 0.5  # 1 - 3^-0.75 = 0.56 is capped


# ---------------------------------------------------------------- errors

def test_errors(inputs, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="CGPO with --guidance ce needs --classifier"):
        train_addt.main(flags(inputs, tmp_path, classifier=False))
    with pytest.raises(UserError, match="pass --ddpm PATH"):
        train_addt.main(["--classifier", inputs["classifier"], "--data", inputs["data"], "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--global-batch 6 is not a multiple of --batch-size 4 x 1 processes"):
        train_addt.main(flags(inputs, tmp_path, "--global-batch", "6", "--batch-size", "4"))
    with pytest.raises(UserError, match="ADDT checkpoint not found"):
        train_addt.main(flags(inputs, tmp_path / "nothing", "--resume"))
    with pytest.raises(UserError, match="200 training images, fewer than --global-batch"):
        train_addt.main(flags(inputs, tmp_path, "--global-batch", "256"))

    class TwoProcesses:  # what torchrun gives rank 0, without starting a process group
        ddp, rank, world, master, device = False, 0, 2, True, torch.device("cpu")

        def agree(self, fn):
            fn()

    monkeypatch.setattr(train_addt, "Dist", lambda device=None: TwoProcesses())
    with pytest.raises(UserError, match="--global-batch 3 is not a multiple of --batch-size 1 x 2 processes"):
        train_addt.main(flags(inputs, tmp_path, "--global-batch", "3"))
    with pytest.raises(UserError, match="--global-batch 1 is not a multiple of --batch-size 1 x 2 processes"):
        train_addt.main(flags(inputs, tmp_path, "--global-batch", "1"))


def test_cli(inputs, tmp_path):
    p = subprocess.run([sys.executable, "train_addt.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and "torchrun --nproc_per_node=8 train_addt.py" in p.stdout and "--perturb" in p.stdout
    p = subprocess.run([sys.executable, "train_addt.py", "--ddpm", inputs["ddpm"]], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: CGPO with --guidance ce needs --classifier")
    assert "Traceback" not in p.stderr
