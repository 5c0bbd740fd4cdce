"""GDMP (Wang et al. 2022): the guidance terms against closed forms, an independent SSIM and autograd; the
sampler against DP_DDPM and against a step-by-step reference written from GDMP's code (its diff_purify,
pytorch_diffusion.denoising_step and pytorch_ssim, with their batch-mean losses); exact attack gradients;
keyed noise; the flags; purify.py and attack.py end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import attack
import purify
from addt_attacks import Defense, pgd_eot
from addt_common import UserError
from addt_diffusion import (GDMP_BATCH, KeyedNoise, ddpm_purify, gdmp_guide_coefs, gdmp_purifier, gdmp_purify,
                            gdmp_schedule, guidance_grad, linear_alpha_bar, make_schedule, ssim, ssim_grad)
from models import build_classifier
from models.unet import UNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet({**attack.TINY_UNET_CONFIG, "sample_size": 16}).eval().requires_grad_(False)


def draws(n, shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


# ---------------------------------------------------------------- the guidance terms

def numpy_ssim(x, y):
    """SSIM per image written directly in numpy/scipy: GDMP's 11x11 Gaussian window (sigma 1.5) applied with
    zero padding around every pixel (ndimage.correlate, mode constant), C1 = 0.01^2, C2 = 0.03^2."""
    r = np.arange(11) - 5
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / g.sum() ** 2
    out = []
    for xb, yb in zip(x, y):
        maps = []
        for xc, yc in zip(xb, yb):
            m = lambda a: ndimage.correlate(a, w, mode="constant", cval=0.0)  # noqa: E731
            mx, my = m(xc), m(yc)
            vx, vy, cxy = m(xc * xc) - mx ** 2, m(yc * yc) - my ** 2, m(xc * yc) - mx * my
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            maps.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(maps))
    return np.array(out)


def test_ssim_matches_a_direct_numpy_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(x, y)
    np.testing.assert_allclose(ours.numpy(), numpy_ssim(x.numpy(), y.numpy()), rtol=1e-12, atol=1e-12)
    assert ours.shape == (3,) and (ours < 0.99).all()
    # closed forms: SSIM(x, x) = 1 exactly (every factor cancels), and x = y is its maximum: zero gradient
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-14)
    assert ssim_grad(x, x).abs().max() < 1e-12


@pytest.mark.parametrize("guidance", ["mse", "ssim"])
def test_guidance_gradient_closed_form_equals_autograd(guidance):
    """grad_x D per image: -2 (x - y) / N for D = -mean((x - y)^2), the chain rule through SSIM's local
    moments for SSIM; both against autograd of D in float64, image by image."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64) * 2 - 1
    y = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    D = -((xg - y) ** 2).flatten(1).mean(1) if guidance == "mse" else conv_ssim(xg, y)
    want = torch.autograd.grad(D.sum(), xg)[0]
    got = guidance_grad(guidance, x, y)
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    if guidance == "mse":
        torch.testing.assert_close(got, -2 * (x - y) / x[0].numel(), rtol=0, atol=0)


def conv_ssim(x, y):
    """An SSIM per image built from F.conv2d as pytorch_ssim builds it (for autograd), independent of ours."""
    r = torch.arange(11, dtype=x.dtype) - 5
    g = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11)
    m = lambda a: F.conv2d(a, w, padding=5, groups=x.shape[1])  # noqa: E731
    mx, my = m(x), m(y)
    vx, vy, cxy = m(x * x) - mx ** 2, m(y * y) - my ** 2, m(x * y) - mx * my
    s = (2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))
    return s.flatten(1).mean(1)


def test_ssim_gradient_is_itself_differentiable():
    """The attack differentiates the guidance (through x_t and through the target y_t): the closed form's
    own derivatives against central differences (gradcheck, float64)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(1, 2, 6, 6, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    y = (x.detach() + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ssim_grad(a, b), (x, y), eps=1e-6, atol=1e-7)


def test_guide_coefficients_are_gdmp_formulas():
    """k_t = exp(logvar_t) * compute_scale(t) / 100 in GDMP's float64 numpy: fixed_large logvar =
    log(append(posterior_variance[1], betas[1:])), scale = sqrt(1 - ab_t) / (m sqrt(ab_t)) with
    m = 8 * 2 / 255 / 3 / guide_scale, over its batch of 100; the schedule diffuses with ab[36] and visits
    t = 35..0."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    logvar = np.log(np.append(post_var[1], betas[1:]))
    sched = gdmp_schedule(0.036)
    assert sched.timesteps == list(range(35, -1, -1)) and sched.t_star == 36 and sched.noisy == [True] * 35 + [False]
    assert sched.alpha_bar_star == float(linear_alpha_bar()[36])
    for scale in (60000.0, 70000.0):
        m = 8.0 * 2 / 255.0 / 3.0 / scale
        t = np.array(sched.timesteps)
        want = np.exp(logvar[t]) * np.sqrt(1 - ab[t]) / (m * np.sqrt(ab[t])) / 100
        coefs = gdmp_guide_coefs(sched, scale)
        np.testing.assert_allclose(coefs[:, 2].numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(coefs[:, 0].numpy() ** 2, ab[t], rtol=1e-5)
    assert GDMP_BATCH == 100


# ---------------------------------------------------------------- the sampler

def test_unguided_gdmp_is_dp_ddpm(unet):
    """--guidance none: one iteration is DP_DDPM with GDMP's schedule, bit for bit; several iterations are
    DP_DDPM applied again to its own output."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    sched = gdmp_schedule(0.006)
    assert sched.timesteps == [5, 4, 3, 2, 1, 0]
    d = draws(3 * (1 + sched.n_noise), x.shape, 5)
    with torch.no_grad():
        one = gdmp_purify(unet, x, sched, d, guidance="none", iters=1)
        assert torch.equal(one, ddpm_purify(unet, x, sched, d))
        three = gdmp_purify(unet, x, sched, d, guidance="none", iters=3)
        chained, k = x, 0
        for _ in range(3):
            chained, k = ddpm_purify(unet, chained, sched, d[k:k + 1 + sched.n_noise]), k + 1 + sched.n_noise
    torch.testing.assert_close(three, chained, rtol=0, atol=1e-6)
    assert (three - one).abs().max() > 1e-3
    # GDMP's step t = 5 from alpha_bar[6] is DP_DDPM's make_schedule at t* = 5 but for the forward depth
    assert make_schedule("ddpm", 5, 0.005).coefs.equal(sched.coefs)


def gdmp_reference(unet, x, n, iters, mode, guide_scale, noise, pur=None):
    """GDMP's code written out step by step: x_adv = 2x - 1; per iteration xt = sqrt(ab[n]) x + sqrt(1 - ab[n])
    eps; for i = n-1..0: cond = grad of the BATCH-mean loss (-F.mse_loss, or the batch-mean SSIM) at x_in
    against x_adv_t = sqrt(ab[i]) x_adv + sqrt(1 - ab[i]) xi, times compute_scale; mean = posterior mean of the
    clipped x0 + exp(logvar) cond with fixed_large logvar = log(append(posterior_variance[1], betas[1:]));
    sample = mean + mask std z. GDMP's quantities in float64 numpy (as pytorch_diffusion); the DDPM step's own
    coefficients are DP_DDPM's (float32, tested against diffusers in test_diffusion.py), which GDMP's float64
    ones differ from by up to 1e-4 relative at t < 5. The guidance gradient by autograd with create_graph, so
    the attack can differentiate it. pur: take the purifier's float32 constants instead (alpha_bar, the
    target's diffusion, var_t s_t = k_t batch), to compare gradients without their rounding."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    logvar = np.log(np.append(post_var[1], betas[1:]))
    coef1, coef2 = betas * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
    step = make_schedule("ddpm", n - 1, (n - 1) / 1000).coefs.double()  # rows: t = n-1, ..., 0
    m = 8.0 * 2 / 255.0 / 3.0 / (guide_scale or 1.0)
    diffuse = {i: (float(np.sqrt(ab[i])), float(np.sqrt(1 - ab[i]))) for i in range(n + 1)}
    var_scale = {i: float(np.exp(logvar[i]) * np.sqrt(1 - ab[i]) / (m * np.sqrt(ab[i]))) for i in range(n)}
    if pur is not None:
        a_n = pur.settings["sched"].alpha_bar_star
        diffuse[n] = (a_n ** 0.5, (1 - a_n) ** 0.5)
        if mode != "none":
            for j, i in enumerate(pur.settings["sched"].timesteps):
                c = pur.settings["guide"][j].double().tolist()
                diffuse[i], var_scale[i] = (c[0], c[1]), c[2] * pur.info["guide_batch"]
    draw = iter(noise)
    x_adv = 2 * x - 1
    xt_reverse = x_adv
    for _ in range(iters):
        x = diffuse[n][0] * xt_reverse + diffuse[n][1] * next(draw)
        for j, i in enumerate(reversed(range(n))):
            cond = 0
            if mode != "none":
                x_adv_t = diffuse[i][0] * x_adv + diffuse[i][1] * next(draw)
                with torch.enable_grad():
                    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
                    selected = -F.mse_loss(x_in, x_adv_t) if mode == "mse" else conv_ssim(x_in, x_adv_t).mean()
                    grad = torch.autograd.grad(selected, x_in, create_graph=x.requires_grad)[0]
                cond = grad * var_scale[i]
            a, b, c0, cx, _, s = step[j].tolist()
            eps = unet(x, torch.full((len(x),), i))
            mean = c0 * (a * x - b * eps).clamp(-1, 1) + cx * x + cond
            x = mean + s * next(draw) if i > 0 else mean  # GDMP masks the noise at t = 0
            gdmp_step = [np.sqrt(1 / ab[i]), np.sqrt(1 / ab[i] - 1), coef1[i], coef2[i],
                         np.exp(0.5 * logvar[i]) * (i > 0)]
            np.testing.assert_allclose([a, b, c0, cx, s], gdmp_step, rtol=2e-4, atol=1e-12)
        xt_reverse = x
    assert next(draw, None) is None
    return ((xt_reverse + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("mode,n,iters", [("mse", 4, 2), ("ssim", 4, 2), ("none", 3, 2)])
def test_sampler_equals_gdmp_equations_and_attack_gradients_are_exact(unet, mode, n, iters):
    """With the same injected noise (float64) the sampler equals the reference written from GDMP's code;
    the attack's input gradient (through the guidance, its target and every UNet call, checkpointed or not)
    equals the reference's autograd gradient and central differences. The batch of 2 stands for GDMP's
    batch (batch=2); a scale of 1000 x makes the guidance matter at this tiny t*."""
    unet = unet.double()
    try:
        scale = {"mse": 1e6, "ssim": 3e3, "none": None}[mode]
        pur = gdmp_purifier(unet, mode, scale, t_star=n / 1000, iters=iters, batch=2)
        g = torch.Generator().manual_seed(6)
        x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 0.8 + 0.1
        w = torch.randn(x.shape, generator=g, dtype=torch.float64)
        d = draws(pur.info["noise_draws"], x.shape, 7, torch.float64)
        with torch.no_grad():
            ours, ref = pur(x, d), gdmp_reference(unet, x, n, iters, mode, scale, d)
            weak = gdmp_purifier(unet, mode, 1e-9, t_star=n / 1000, iters=iters, batch=2) if scale else pur
            same_constants = gdmp_reference(unet, x, n, iters, mode, scale, d, pur)
        torch.testing.assert_close(ours, same_constants, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # constants rounded to float32 differ by ~1e-7
        if mode != "none":  # the guidance moves the result (same draws, guidance almost off)
            assert (ours - weak(x, d)).abs().max() > 1e-2
        grads = {}
        for name in ("plain", "checkpoint", "reference"):
            xg = x.clone().requires_grad_(True)
            pur.grad_checkpoint = name == "checkpoint"
            out = gdmp_reference(unet, xg, n, iters, mode, scale, d, pur) if name == "reference" else pur(xg, d)
            grads[name] = torch.autograd.grad((out * w).sum(), xg)[0]
        pur.grad_checkpoint = False
        assert grads["plain"].abs().max() > 0
        torch.testing.assert_close(grads["plain"], grads["reference"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads["checkpoint"], grads["plain"], rtol=1e-9, atol=1e-12)
        f = lambda z: (pur(z, d) * w).sum()  # noqa: E731
        with torch.no_grad():
            for seed in (8, 9):
                v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                # kinks (x0 clip, final clamp): one of two small steps must agree
                err = min(abs((f(x + h * v) - f(x - h * v)) / (2 * h) - (grads["plain"] * v).sum())
                          for h in (1e-6, 1e-7))
                assert err < 1e-6 * max(1.0, abs((grads["plain"] * v).sum()))
    finally:
        unet.float()


def test_batch_invariance_and_keyed_noise(unet):
    """An image's purification does not depend on its batch (GDMP's batch mean is per image here); keyed
    noise as dw-both fixes it, as white-box varies it, and dw-fwd shares only draw 0."""
    pur = gdmp_purifier(unet, "ssim", t_star=0.004, iters=2)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    d = draws(pur.info["noise_draws"], x.shape, 11)
    with torch.no_grad():
        batch = pur(x, d)
        for b in range(3):
            torch.testing.assert_close(pur(x[b:b + 1], [t[b:b + 1] for t in d]), batch[b:b + 1], rtol=0, atol=1e-6)
        fixed, fresh = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
        both = [pur(x, KeyedNoise(fresh + i, fixed, float("inf"))) for i in range(2)]
        assert torch.equal(both[0], both[1])
        white = [pur(x, KeyedNoise(fresh + 10 * i)) for i in range(2)]
        assert (white[0] - white[1]).abs().max() > 1e-3
        trace = [[], []]
        for i in range(2):
            pur(x, KeyedNoise(fresh + 10 * i, fixed, 1), trace=trace[i])
        assert torch.equal(trace[0][0], trace[1][0]) and not torch.equal(trace[0][1], trace[1][1])
    assert len(trace[0]) == 2 * (1 + 4) and pur.info["model_calls"] == 8 and pur.info["noise_draws"] == 2 * (1 + 4 + 3)


def test_dw_both_attack_is_deterministic(unet):
    """The attack machinery treats GDMP as any family: under dw-both two runs give the same x_adv."""
    clf = build_classifier("wrn-10-1", 10).eval().requires_grad_(False)
    pur = gdmp_purifier(unet, "mse", t_star=0.003, iters=2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    y = torch.tensor([1, 2])
    runs = [pgd_eot(Defense(pur, clf, "dw-both", seed=3, chunk=4, grad_checkpoint="on"), x, y, [0, 1], steps=2, eot=1)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and (runs[0][0] - x).abs().max() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused DDPM step runs on CUDA only")
def test_fused_step_on_cuda_gives_the_reference_gradients(unet, monkeypatch):
    """On CUDA each step runs the fused Triton kernel: GDMP's output and attack gradient equal the plain
    torch step's (the guidance is added beside the kernel, outside its autograd Function)."""
    import addt_diffusion
    net = UNet({**attack.TINY_UNET_CONFIG, "sample_size": 16}).eval().requires_grad_(False).cuda()
    net.load_state_dict(unet.state_dict())
    pur = gdmp_purifier(net, "ssim", t_star=0.004, iters=2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(13)).cuda()
    d = [t.cuda() for t in draws(pur.info["noise_draws"], x.shape, 14)]
    out = {}
    for name in ("fused", "torch"):
        if name == "torch":
            real = addt_diffusion.reverse_step
            monkeypatch.setattr(addt_diffusion, "reverse_step", lambda *a: real(*a, use_kernel=False))
        xg = x.clone().requires_grad_(True)
        y = pur(xg, d)
        out[name] = (y.detach(), torch.autograd.grad(y.square().sum(), xg)[0])
    torch.testing.assert_close(out["fused"][0], out["torch"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["fused"][1], out["torch"][1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- flags and scripts

def test_flags_defaults_and_refusals(tmp_path):
    a = attack.parse_args(["--defense", "gdmp", "--out", str(tmp_path / "a")])
    assert (a.guidance, a.guide_scale, a.gdmp_iters, a.t_star, a.nfe) == ("mse", 60000.0, 4, 0.036, None)
    a = attack.parse_args(["--defense", "gdmp", "--guidance", "ssim", "--out", str(tmp_path / "b")])
    assert a.guide_scale == 70000.0
    a = attack.parse_args(["--defense", "gdmp", "--guidance", "none", "--out", str(tmp_path / "c")])
    assert a.guide_scale is None
    for extra, match in ((["--nfe", "10"], "--nfe applies to"), (["--eta", "0.5"], "--eta applies"),
                         (["--guidance", "none", "--guide-scale", "5"], "--guide-scale applies to --guidance"),
                         (["--t-star", "0.0365"], "multiple of 1/1000"), (["--t-star", "0.001"], "2/1000"),
                         (["--gdmp-iters", "0"], "--gdmp-iters must be positive"),
                         (["--guide-scale", "-1"], "--guide-scale must be positive"),
                         (["--guide-scale", "nan"], "--guide-scale must be positive"),
                         (["--guidance", "ssim", "--t-star", "nan"], "--t-star must lie in")):
        with pytest.raises(UserError, match=match):
            attack.parse_args(["--defense", "gdmp", "--out", str(tmp_path / "d"), *extra])
    for flag, value in (("--guidance", "mse"), ("--gdmp-iters", "2"), ("--guide-scale", "10")):
        with pytest.raises(UserError, match=f"{flag} applies to --defense gdmp, not ddpm"):
            purify.parse_args(["--defense", "ddpm", flag, value, "--out", str(tmp_path / "e")])
    proc = subprocess.run([sys.executable, "attack.py", "--defense", "gdmp", "--nfe", "10", "--out",
                           str(tmp_path / "f")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --nfe applies to") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_purify_and_attack_run_gdmp_end_to_end(smoke_inputs, tmp_path):
    common = ["--defense", "gdmp", "--ddpm", smoke_inputs["ddpm"], "--classifier", smoke_inputs["classifier"],
              "--data", smoke_inputs["data"], "--t-star", "0.004", "--gdmp-iters", "2", "--device", "cpu"]
    res = purify.main([*common, "--guidance", "ssim", "--num-images", "4", "--batch-size", "3", "--grid", "2",
                       "--out", str(tmp_path / "p")])
    saved = json.load(open(tmp_path / "p" / "results.json"))
    assert saved["purifier"]["family"] == "gdmp" and saved["purifier"]["guidance"] == "ssim"
    assert saved["timesteps"] == [3, 2, 1, 0] and saved["purifier"]["model_calls"] == 8
    assert res["n"] == 4 and (tmp_path / "p" / "grid.png").exists()
    for setting in ("white-box", "dw-both"):
        s = attack.main([*common, "--setting", setting, "--num-images", "2", "--steps", "1", "--chunk", "4",
                         *(["--eot", "2"] if setting == "white-box" else []), "--out", str(tmp_path / setting)])
        assert s["n"] == 2 and s["args"]["defense"] == "gdmp" and s["purifier"]["guidance"] == "mse"
        assert s["model_calls"] == 8 and 0 <= s["robust_accuracy"] <= 100
