"""Purification core against diffusers' DDPMScheduler / DDIMScheduler, step by step."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from attack import TINY_UNET_CONFIG
from addt_common import UserError
from addt_diffusion import ddpm_purify, linear_alpha_bar, make_schedule, respaced_timesteps
from models.unet import UNet

SCHED_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                    clip_sample=True)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet({**TINY_UNET_CONFIG, "sample_size": 16}).eval()


def diffusers_trajectory(unet, sampler, n, x, eps, zs, eta=0.0, monkeypatch=None):
    """x_t after the forward diffusion and after every reverse step, with diffusers' schedulers."""
    if sampler == "ddpm":
        sched = DDPMScheduler(**SCHED_CONFIG, variance_type="fixed_large")
        draws = iter(zs)  # diffusers draws the step noise itself: hand it ours, in order
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(draws))
    else:
        sched = DDIMScheduler(**SCHED_CONFIG, set_alpha_to_one=True)
    sched.set_timesteps(n)
    tail = [int(t) for t in sched.timesteps if t <= 100]
    x_t = sched.add_noise(2 * x - 1, eps, torch.tensor([100]))
    traj = [x_t]
    k = 0
    with torch.no_grad():
        for i, t in enumerate(tail):
            out = unet(x_t, torch.full((len(x),), t))
            if sampler == "ddpm":
                x_t = sched.step(out, t, x_t).prev_sample
            else:
                z = zs[k] if k < len(zs) else torch.zeros_like(x_t)  # the last step has no noise
                k += 1
                x_t = sched.step(out, t, x_t, eta=eta, variance_noise=z).prev_sample
            traj.append(x_t)
    return tail, traj


@pytest.mark.parametrize("sampler,n,eta", [("ddpm", 50, 0.0), ("ddpm", 100, 0.0), ("ddpm", 1000, 0.0),
                                           ("ddim", 50, 0.0), ("ddim", 100, 0.0), ("ddim", 1000, 0.0),
                                           ("ddim", 100, 0.5)])
def test_trajectory_matches_diffusers(unet, monkeypatch, sampler, n, eta):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(2, 3, 16, 16, generator=g)
    sched = make_schedule(sampler, nfe=n // 10, eta=eta)
    eps = torch.randn(x.shape, generator=g)
    zs = torch.randn((sched.n_noise, *x.shape), generator=g)
    tail, ref = diffusers_trajectory(unet, sampler, n, x, eps, zs, eta, monkeypatch)
    assert sched.timesteps == tail
    ours = []
    with torch.no_grad():
        out = ddpm_purify(unet, x, sched, (eps, zs), trace=ours)
    assert len(ours) == len(ref) == len(tail) + 1
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max() < 1e-5, f"step {step}: {(a - b).abs().max()}"
    assert torch.allclose(out, (ref[-1] + 1) / 2, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1  # the last step returns the clipped x0


def test_noise_counts():
    assert make_schedule("ddpm", 100).n_noise == 100  # every step but t = 0
    assert make_schedule("ddim", 10).n_noise == 0
    assert make_schedule("ddim", 10, eta=1.0).n_noise == 10  # the last step (to alpha_bar = 1) adds none


def test_paper_timestep_lists():
    assert respaced_timesteps(5) == [100, 80, 60, 40, 20, 0]
    assert respaced_timesteps(10) == list(range(100, -1, -10))
    assert respaced_timesteps(20) == list(range(100, -1, -5))
    assert respaced_timesteps(50) == list(range(100, -1, -2))
    assert respaced_timesteps(100) == list(range(100, -1, -1))
    assert make_schedule("ddpm", 5, t_star=0.2).timesteps == [200, 160, 120, 80, 40, 0]


@pytest.mark.parametrize("nfe", [3, 7, 0, 101])
def test_nfe_that_does_not_divide_is_refused(nfe):
    with pytest.raises(UserError, match="does not divide"):
        make_schedule("ddpm", nfe)


def test_alpha_bar_values():
    ab = linear_alpha_bar().double()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(ab, torch.cumprod(1 - betas, 0), rtol=1e-5)
    assert abs(ab[100].item() - 0.89514) < 1e-5  # t* = 100 keeps sqrt(0.895) = 0.946 of the signal


def test_determinism_with_and_without_supplied_noise(unet):
    sched = make_schedule("ddpm", 10)
    x = torch.rand(3, 3, 16, 16)
    eps, zs = torch.randn(x.shape), torch.randn((sched.n_noise, *x.shape))
    with torch.no_grad():
        a, b = ddpm_purify(unet, x, sched, (eps, zs)), ddpm_purify(unet, x, sched, (eps, zs))
        c, d = ddpm_purify(unet, x, sched), ddpm_purify(unet, x, sched)
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        assert torch.equal(ddpm_purify(unet, x, sched, g1), ddpm_purify(unet, x, sched, g2))


def test_batched_eot_equals_separate_calls(unet):
    """k purifications of one image in one batch (EoT draws in the batch dimension) = k calls."""
    sched = make_schedule("ddpm", 10)
    x = torch.rand(1, 3, 16, 16)
    k = 4
    eps, zs = torch.randn(k, 3, 16, 16), torch.randn(sched.n_noise, k, 3, 16, 16)
    with torch.no_grad():
        batched = ddpm_purify(unet, x.expand(k, -1, -1, -1), sched, (eps, zs))
        single = torch.cat([ddpm_purify(unet, x, sched, (eps[i:i + 1], zs[:, i:i + 1])) for i in range(k)])
    assert (batched - single).abs().max() < 1e-6
    assert not torch.allclose(batched[0], batched[1])  # the draws really differ


def test_wrong_noise_count_is_refused(unet):
    sched = make_schedule("ddpm", 5)
    with pytest.raises(ValueError, match="noise draw 3, but only 3 draws"):  # NFE 5 takes 1 + 5 draws
        ddpm_purify(unet, torch.rand(1, 3, 16, 16), sched, (torch.randn(1, 3, 16, 16), torch.randn(2, 1, 3, 16, 16)))
