"""The VP-SDE's extra Langevin corrector (the paper's table 10 and appendix G; addt_diffusion.langevin_step,
vpsde_purify(corrector="langevin")) against independent implementations.

Oracles: diffusers' ScoreSdeVeScheduler.step_correct (the corrector diffusers' PC pipelines run) driven one
image at a time with the same noise (its norms are batch means; with one image they are that image's, which is
what ADDT's step_correct and ours use), torchsde's Euler-Maruyama for the predictor, score_sde's VPSDE formulas
(std, the discrete alphas) restated from its source, plain autograd and central differences.
Fixture: ../shared/fixtures/vpsde_ddpmpp/checkpoint_8.pth (score_sde's NCSN++, small config, written by
score_sde's own code; read in place as tests/test_vpsde.py does: 5.4 MB, over the 2 MB limit for copies).
"""
import json
import math
import subprocess
import sys

import pytest
import torch
import torchsde
from diffusers import ScoreSdeVeScheduler

import attack
import purify
from addt_attacks import ATTACK, EVAL, Defense
from addt_common import UserError
from addt_diffusion import (T, KeyedNoise, diffuse, fixed_noise, langevin_alphas, langevin_step, linear_alpha_bar,
                            vpsde_coefficients, vpsde_purifier, vpsde_purify, vpsde_step, vpsde_times)
from models.ncsnpp import load_score_sde
from test_vpsde import draws, shared, tiny_model

SNR = 0.16


@pytest.fixture(scope="module")
def small_model():
    return load_score_sde(shared("checkpoint_8.pth"))


def score_sde_std(tau, beta_min=0.1, beta_max=20.0):
    """score_sde's VPSDE.marginal_prob std, restated from its source."""
    log_mean_coeff = -0.25 * tau ** 2 * (beta_max - beta_min) - 0.5 * tau * beta_min
    return torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))


def score_sde_alpha(tau, N=1000, beta_min=0.1, beta_max=20.0):
    """LangevinCorrector's alpha for a VPSDE: sde.alphas[(t * (N - 1) / T).long()], alphas = 1 - discrete_betas."""
    alphas = 1.0 - torch.linspace(beta_min / N, beta_max / N, N)
    return alphas[(tau * (N - 1) / 1).long()]


def diffusers_corrector(model, y, tau, generator):
    """diffusers' step_correct on each image alone (batch 1: its batch-mean norms are that image's), on the
    VP score -model(y, 999 tau) / std(tau); score_sde's VP alpha enters as snr' = snr sqrt(alpha), since
    diffusers' step is 2 (snr' ||z|| / ||score||)^2. Returns the corrected batch and the noise it drew."""
    out, noise = [], []
    sched = ScoreSdeVeScheduler(snr=SNR * math.sqrt(float(score_sde_alpha(tau))))
    sched.set_timesteps(10)
    for i in range(y.shape[0]):
        yi = y[i:i + 1]
        score = -model(yi, (tau * 999).expand(1)) / score_sde_std(tau)
        replay = torch.Generator().set_state(generator.get_state())
        noise.append(torch.randn(yi.shape, generator=replay))  # what randn_tensor is about to draw
        out.append(sched.step_correct(score, yi, generator=generator).prev_sample)
    return torch.cat(out), torch.cat(noise)


# ---------------------------------------------------------------- against the oracles

def test_alpha_is_score_sde_s():
    labels = vpsde_coefficients(vpsde_times(0.1))[:, 0]
    taus = 1 - vpsde_times(0.1)[:-1]
    assert torch.equal(langevin_alphas(labels), score_sde_alpha(taus))
    assert torch.equal(langevin_alphas(torch.tensor([0.0, 999.5])), 1 - torch.tensor([0.1 / T, 20.0 / T]))


def test_one_corrector_step_equals_diffusers(small_model):
    """One Langevin step on a batch of 3 at three times equals diffusers' step_correct with the same noise,
    image by image; with the batch mean of score_sde / diffusers the batch would change every image."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for s in (0.9, 0.95, 0.999):
        coef = vpsde_coefficients(torch.tensor([s, s + 1e-3]))[0]
        tau = 1 - torch.tensor(s)
        g = torch.Generator().manual_seed(int(s * 1000))
        with torch.no_grad():
            ref, z = diffusers_corrector(small_model, x, tau, g)
            ours = langevin_step(small_model, x, z, coef, langevin_alphas(coef[:1])[0], SNR)
            scale = (ref - x).abs().max()
            assert scale > 1e-3 and (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
            batch_mean = ScoreSdeVeScheduler(snr=SNR * math.sqrt(float(score_sde_alpha(tau))))
            batch_mean.set_timesteps(10)
            score = -small_model(x, (tau * 999).expand(3)) / score_sde_std(tau)
            mixed = batch_mean.step_correct(score, x, generator=torch.Generator().set_state(g.get_state())).prev_sample
            assert (mixed - ref).abs().max() > 1e-6  # the batch-mean step is not each image's


def test_pc_purification_equals_torchsde_and_diffusers(small_model):
    """A whole predictor-corrector purification (t* = 0.02, 20 steps) with injected noise: ours equals
    diffusers' corrector then one torchsde Euler step of DiffPure's reverse SDE, step by step."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    class RevVPSDE(torch.nn.Module):  # DiffPure's f and g, in torchsde time s = 1 - tau, on flat states
        noise_type, sde_type = "diagonal", "ito"

        def f(self, s, y):
            tau = 1 - s.expand(y.shape[0])
            beta = 0.1 + tau * (20.0 - 0.1)
            score = -small_model(y.view(x.shape), tau * 999).view(y.shape) / score_sde_std(tau)[:, None]
            return -(-0.5 * beta[:, None] * y - torch.sqrt(beta)[:, None] ** 2 * score)

        def g(self, s, y):
            return torch.sqrt(0.1 + (1 - s) * (20.0 - 0.1)).expand(y.shape)

    times = vpsde_times(0.02)
    steps = len(times) - 1
    bm = torchsde.BrownianInterval(t0=times[0], t1=times[-1], size=(2, x[0].numel()), entropy=4)
    gen = torch.Generator().manual_seed(5)
    alpha_bar = torch.cumprod(1 - torch.linspace(0.1 / 1000, 20 / 1000, 1000), 0)[19]  # DiffPure's discrete a[t - 1]
    y = (2 * x - 1) * alpha_bar.sqrt() + eps * (1 - alpha_bar).sqrt()
    zs, zc = [], []
    with torch.no_grad():
        for s, s_next in zip(times[:-1], times[1:]):
            y, z = diffusers_corrector(small_model, y, 1 - s, gen)
            zc.append(z)
            y = torchsde.sdeint(RevVPSDE(), y.flatten(1), torch.stack([s, s_next]), method="euler", dt=1.0,
                                bm=bm)[-1].view(x.shape)
            zs.append(bm(s, s_next).view(x.shape) / (s_next - s).sqrt())
        asked = []
        replay = fixed_noise([eps, *zs, *zc])

        def noise(k, like):
            asked.append(k)
            return replay(k, like)

        purifier = vpsde_purifier(small_model, t_star=0.02, corrector="langevin")
        ours = purifier(x, noise)
    assert asked == [0] + [k for i in range(steps) for k in (1 + steps + i, 1 + i)]  # corrector, then Euler
    assert purifier.info["model_calls"] == 2 * steps and purifier.info["noise_draws"] == 1 + 2 * steps == len(asked)
    assert (ours * 2 - 1 - y).abs().max() <= 1e-4 * max(1.0, y.abs().max())
    without = vpsde_purify(small_model, x, fixed_noise([eps, *zs]), t_star=0.02)
    assert (without - ours).abs().max() > 1e-2  # the corrector matters


def test_corrector_off_is_todays_sampler_bit_for_bit():
    """No corrector: the Euler loop exactly as before (same draws 0..steps, same numbers, same info)."""
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    noise = draws(11, x.shape, 7)
    purifier = vpsde_purifier(model, t_star=0.01)
    with torch.no_grad():
        y = diffuse(x, noise[0], float(linear_alpha_bar(T, 0.1 / T, 20.0 / T)[9]))
        for k, coef in enumerate(vpsde_coefficients(vpsde_times(0.01))):
            y = vpsde_step(model, y, noise[1 + k], coef)
        assert torch.equal(purifier(x, fixed_noise(noise)), (y + 1) / 2)
        assert torch.equal(vpsde_purify(model, x, fixed_noise(noise), t_star=0.01, corrector=None), (y + 1) / 2)
    assert set(purifier.info) == {"family", "t_star", "beta_min", "beta_max", "dt", "steps", "alpha_bar_star",
                                  "sde_times", "model_calls", "noise_draws"}
    assert purifier.info["noise_draws"] == 11 and purifier.info["model_calls"] == 10
    with pytest.raises(ValueError, match="corrector"):
        vpsde_purifier(model, corrector="ald")
    with pytest.raises(ValueError, match="corrector"):
        vpsde_purify(model, x, corrector="none")
    with pytest.raises(ValueError, match="snr"):
        vpsde_purifier(model, corrector="langevin", snr=0.0)


def test_several_corrector_steps_and_batch_invariance():
    """corrector_steps 2: draws 1 + steps + 2k + j, three network calls per step; a batch of 3 gives what
    each image gives alone (per-image norms)."""
    model = tiny_model()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    purifier = vpsde_purifier(model, t_star=0.005, corrector="langevin", snr=0.2, corrector_steps=2)
    assert purifier.info["model_calls"] == 15 and purifier.info["noise_draws"] == 16
    noise = draws(16, x.shape, 9)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        batch = purifier(x, fixed_noise(noise))
        alone = torch.cat([purifier(x[i:i + 1], fixed_noise([z[i:i + 1] for z in noise])) for i in range(3)])
    hook.remove()
    assert len(calls) == 4 * 15
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    with torch.no_grad():  # step j of step k: draws 6 + 2k + j (the 3rd-from-last draw is step 4's first)
        moved = purifier(x, fixed_noise(noise[:13] + [noise[13] * 0] + noise[14:]))
    assert (moved - batch).abs().max() > 0


# ---------------------------------------------------------------- attacks

def test_dw_both_makes_the_pc_sampler_deterministic():
    """dw-both: every draw (the corrector's too) fixed per image, so attack and evaluation pipelines agree;
    dw-fwd fixes the forward noise only, and white-box none."""
    model = tiny_model()
    purifier = vpsde_purifier(model, t_star=0.005, corrector="langevin")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    outs = {}
    with torch.no_grad():
        for setting in ("white-box", "dw-fwd", "dw-both"):
            d = Defense(purifier, None, setting)
            a = purifier(x, d.noise([(0, 0, 0)], ATTACK, x.device))  # (image, step, draw)
            b = purifier(x, d.noise([(0, 3, 1)], EVAL, x.device))
            outs[setting] = (a - b).abs().max().item()
        # the corrector's draws (6..10 here) are keyed draws like the others: fix draws 0..5, vary the rest
        keys = Defense(purifier, None, "dw-fwd").noise([(0, 0, 0)], ATTACK, x.device)
        c = purifier(x, KeyedNoise(keys.fresh, keys.fixed, 6)) - purifier(x, KeyedNoise(keys.fresh + 1, keys.fixed, 6))
    assert outs["dw-both"] == 0.0 and outs["dw-fwd"] > 0 and outs["white-box"] > 0
    assert c.abs().max() > 0


def test_gradients_exact_through_the_corrector(checkpointed_grads_exact):
    """Fixed noise: the input gradient with grad_checkpoint equals plain autograd, and (float64) matches
    central differences along 2 random directions. t* = 0.01 (10 steps, 20 network calls)."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    for dtype in (torch.float32, torch.float64):
        model, noise = tiny_model(dtype), draws(21, x.shape, 13, dtype)
        xd, wd = x.to(dtype), w.to(dtype)

        def loss(x, grad_checkpoint):
            out = vpsde_purify(model, x, fixed_noise(noise), t_star=0.01, corrector="langevin",
                               grad_checkpoint=grad_checkpoint)
            return (out * wd).sum()

        checkpointed_grads_exact(loss, xd, (14, 15))


# ---------------------------------------------------------------- the scripts

def smoke_argv(inputs, out, *extra):
    return ["--defense", "vpsde", "--vpsde", inputs["vpsde"], "--nfe", "5", "--classifier", inputs["classifier"],
            "--data", inputs["data"], "--device", "cpu", "--out", str(out), *extra]


def test_purify_and_attack_run_with_the_corrector(smoke_inputs, tmp_path):
    res = purify.main(smoke_argv(smoke_inputs, tmp_path / "p", "--corrector", "langevin", "--num-images", "4",
                                 "--batch-size", "3"))
    info = res["purifier"]
    assert (info["corrector"], info["snr"], info["corrector_steps"], info["model_calls"]) == ("langevin", 0.16, 1, 10)
    assert res["args"]["corrector"] == "langevin" and 0 <= res["purified_accuracy"] <= 100
    runs = {}
    for bs in (1, 2):
        out = tmp_path / f"a{bs}"
        s = attack.main(smoke_argv(smoke_inputs, out, "--corrector", "langevin", "--snr", "0.2", "--setting", "dw-both",
                                   "--steps", "2", "--n", "3", "--chunk", "2", "--batch-size", str(bs)))
        runs[bs] = {r["index"]: r for r in attack.read_records(str(out)).values()}
    assert s["purifier"]["snr"] == 0.2 and s["model_calls"] == 10 and s["args"]["corrector"] == "langevin"
    assert attack.summary_row(s)["defense"] == "vpsde+langevin"
    assert runs[1] == runs[2]  # per-image norms: the records do not depend on the batch size
    plain = attack.main(smoke_argv(smoke_inputs, tmp_path / "plain", "--setting", "dw-both", "--steps", "1", "--n", "1",
                                  "--chunk", "1"))
    assert plain["args"]["corrector"] == "none" and "corrector" not in plain["purifier"]
    assert attack.summary_row(plain)["defense"] == "vpsde"


@pytest.mark.parametrize("extra, message", [
    (["--defense", "ddpm", "--corrector", "langevin"], "--corrector applies to --defense vpsde"),
    (["--defense", "edm", "--snr", "0.1"], "--snr applies to --defense vpsde"),
    (["--defense", "vpsde", "--snr", "0.1"], "--snr applies to --corrector langevin only"),
    (["--defense", "vpsde", "--corrector", "none", "--corrector-steps", "2"], "--corrector-steps applies to --corr"),
    (["--defense", "vpsde", "--corrector", "langevin", "--snr", "0"], "--snr must be positive"),
    (["--defense", "vpsde", "--corrector", "langevin", "--snr", "-0.16"], "--snr must be positive"),
    (["--defense", "vpsde", "--corrector", "langevin", "--snr", "nan"], "--snr must be positive"),
    (["--defense", "vpsde", "--corrector", "langevin", "--corrector-steps", "0"], "--corrector-steps must be positive"),
])
def test_bad_flags_refused(extra, message):
    with pytest.raises(UserError, match=message):
        attack.parse_args(extra)
    with pytest.raises(UserError, match=message):
        purify.parse_args(extra)


def test_defaults_and_one_line_error(tmp_path):
    a = attack.parse_args(["--defense", "vpsde", "--corrector", "langevin"])
    assert (a.corrector, a.snr, a.corrector_steps) == ("langevin", 0.16, 1)
    a = attack.parse_args(["--defense", "vpsde"])
    assert (a.corrector, a.snr, a.corrector_steps) == ("none", None, None)
    a = attack.parse_args(["--defense", "ddpm"])
    assert (a.corrector, a.snr, a.corrector_steps) == (None, None, None)
    proc = subprocess.run([sys.executable, "purify.py", "--defense", "vpsde", "--snr", "0.2", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=attack.os.path.dirname(attack.__file__))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --snr applies to --corrector langevin only"]
    assert json.dumps(a.__dict__)  # the flags stay JSON (args.json, fingerprints)
