"""Diffusion core: noise sources, the linear DDPM schedule, respaced DDPM/DDIM reverse steps exactly as
diffusers' DDPMScheduler(variance_type="fixed_large") / DDIMScheduler produce them after
set_timesteps(n), the purification samplers of every family, and `Purifier`, the callable
`purify(x, noise)` that scripts and attacks use (SPEC.md, "Purification").

Noise (the convention every sampler follows, edm style): all randomness of a purification comes from
`noise(k, like)`, which returns draw k, a standard-normal tensor shaped like `like` (batch first).
Draw 0 is the forward noise (the one dw-fwd fixes); draws 1, 2, ... are the reverse process's, in the
order the sampler uses them. A fresh generator, fixed tensors (`(eps, zs)` or a list of draws) or the
attack's keyed noise (`KeyedNoise`) can stand behind it, so every attack setting works for every
family and for a user's own purifier. Samplers draw their noise outside any checkpointed region.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, replace

import torch
from torch.utils import checkpoint as _ckpt
from torch.utils.checkpoint import checkpoint

from addt_common import COMPILE_MODES, UserError, keyed_normal, load_kernel, prepare_model, torch_save
from addt_data import check_fits, load_split
from models import load_classifier

reverse_step = load_kernel("ddpm_step").reverse_step

T = 1000  # training timesteps
DEFAULT_NFE = {"ddpm": 100, "ddim": 10}  # SPEC.md: DP_DDPM n = 1000, DP_DDIM n = 100 (tables 3, 5)


# ---------------------------------------------------------------- noise sources: noise(k, like) -> draw k

def fresh_noise(generator=None):
    """Draws from `generator` (torch's default one when None), in the order they are asked for."""
    return lambda k, like: torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def fixed_noise(draws):
    """Replays given tensors: draws[k] is draw k (each shaped like the batch)."""
    def noise(k, like):
        if k >= len(draws):
            raise ValueError(f"the purification asks for noise draw {k}, but only {len(draws)} draws were given")
        return draws[k].to(like.device, like.dtype)
    return noise


class KeyedNoise:
    """The attack's noise for a batch of pipelines (see addt_common.keyed_normal): draw k of pipeline b
    is keyed by fixed[b] for k < n_fixed and by fresh[b] otherwise. white-box: n_fixed 0;
    dw-fwd: 1 (the forward noise); dw-both and dw-semi: all (math.inf)."""

    def __init__(self, fresh, fixed=None, n_fixed=0):
        self.fresh, self.fixed, self.n_fixed = fresh, fixed, n_fixed

    def __call__(self, k, like):
        keys = self.fixed if k < self.n_fixed else self.fresh
        return keyed_normal(keys, k, like.shape[1:], like.device).to(like.dtype)


def as_noise(noise):
    """None or a torch.Generator -> fresh draws; (eps, zs) with zs (n, B, ...) or a list of draws ->
    replayed; a callable noise(k, like) -> itself."""
    if noise is None or isinstance(noise, torch.Generator):
        return fresh_noise(noise)
    if callable(noise):
        return noise
    if isinstance(noise, tuple) and len(noise) == 2 and torch.is_tensor(noise[0]) and torch.is_tensor(noise[1]):
        eps, zs = noise
        return fixed_noise([eps, *zs])
    return fixed_noise(list(noise))


# ---------------------------------------------------------------- activation checkpointing per network call

# The outputs that selective checkpointing keeps: convolutions, matmuls and attention (the costly ops);
# norms, activations and the other cheap ops between them are recomputed in the backward pass.
_aten = torch.ops.aten
SAVED_OPS = {getattr(_aten, name).default for name in (
    "convolution", "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(_aten, name)}


# selective checkpointing's policy API arrived in torch 2.5; on 2.4 the flag is refused (check_selective)
SELECTIVE = hasattr(_ckpt, "create_selective_checkpoint_contexts")


def check_selective():
    if not SELECTIVE:
        raise UserError(f"selective checkpointing needs torch >= 2.5 (this is {torch.__version__}): "
                        "use --grad-checkpoint on")


def _keep_costly(ctx, op, *args, **kwargs):
    policy = _ckpt.CheckpointPolicy
    return policy.MUST_SAVE if op in SAVED_OPS else policy.PREFER_RECOMPUTE


def checkpointed(mode, fn, *args):
    """fn(*args) under torch's non-reentrant activation checkpointing: mode True recomputes the whole call
    in the backward pass (memory: the call's inputs only), 'selective' keeps the outputs of SAVED_OPS and
    recomputes the rest (less recomputation, more memory). Gradients equal plain autograd's."""
    if mode == "selective":
        check_selective()
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: _ckpt.create_selective_checkpoint_contexts(_keep_costly))
    return checkpoint(fn, *args, use_reentrant=False)


# ---------------------------------------------------------------- DP_DDPM and DP_DDIM

def linear_alpha_bar(T=T, beta_start=1e-4, beta_end=0.02):
    """alpha_bar[t] = prod(1 - beta[0..t]), t = 0..T-1, computed in float32 like diffusers."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def respaced_timesteps(nfe, t_star=100, T=T):
    """The reverse timesteps that start at t_star: the tail of diffusers' set_timesteps(n) with
    'leading' spacing, where the paper's NFE k means n = k T / t_star (NFE 5 -> 100, 80, ..., 0)."""
    if not 1 <= nfe <= t_star or (nfe * T) % t_star:
        raise UserError(f"--nfe {nfe} does not divide the schedule: nfe * {T} must be a multiple of "
                        f"t* = {t_star} (for t* = 100 any nfe that divides 100, e.g. 5, 10, 20, 50, 100)")
    n = nfe * T // t_star
    step = T // n
    if t_star % step or t_star // step != nfe:
        raise UserError(f"--nfe {nfe} does not divide the schedule: set_timesteps({n}) visits multiples "
                        f"of {step}, which skip t* = {t_star}; pick an nfe that divides {t_star}")
    return list(range(t_star, -1, -step))


@dataclass
class Schedule:
    """A purification schedule: forward diffusion to t_star, then reverse steps over `timesteps`.
    coefs[i] = (a, b, c0, cx, ce, s) of step i (see kernels/ddpm_step.py); noisy[i] says whether step
    i adds noise, so zs has one slice per noisy step."""
    sampler: str
    nfe: int
    t_star: int
    eta: float
    timesteps: list
    alpha_bar_star: float
    coefs: torch.Tensor  # (steps, 6) float32
    noisy: list

    @property
    def n_noise(self):
        return sum(self.noisy)


def make_schedule(sampler="ddpm", nfe=100, t_star=0.1, eta=0.0, T=T):
    """t_star is a fraction of T (0.1 -> t = 100), as in the paper."""
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"unknown sampler {sampler!r}: use ddpm or ddim")
    if sampler == "ddpm" and eta:
        raise UserError("--eta applies to the ddim sampler only")
    t_star_int = round(t_star * T)
    if not 0 < t_star_int < T:
        raise UserError(f"--t-star {t_star} must lie in (0, 1)")
    return reverse_schedule(sampler, nfe, t_star_int, eta, respaced_timesteps(nfe, t_star_int, T), T)


def generation_schedule(sampler="ddpm", steps=1000, eta=0.0, T=T):
    """Sampling from pure noise, as diffusers' DDPMPipeline / DDIMPipeline after set_timesteps(steps) ('leading'
    spacing: (steps - 1) T // steps, ..., T // steps, 0; all 1000 steps by default). x_T is the noise itself:
    alpha_bar_star = 0, so ddpm_purify's forward step returns draw 0 whatever the image."""
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"unknown sampler {sampler!r}: use ddpm or ddim")
    if sampler == "ddpm" and eta:
        raise UserError("--eta applies to the ddim sampler only")
    if not 1 <= steps <= T:
        raise UserError(f"--steps must lie in [1, {T}], not {steps}")
    timesteps = list(range((steps - 1) * (T // steps), -1, -(T // steps)))
    return reverse_schedule(sampler, steps, T, eta, timesteps, T, alpha_bar_star=0.0)


def reverse_schedule(sampler, nfe, t_star, eta, timesteps, T=T, alpha_bar_star=None):
    """The Schedule of reverse steps over `timesteps` (from x_{t_star}, alpha_bar_star = alpha_bar[t_star]
    unless given)."""
    alpha_bar = linear_alpha_bar(T)
    one = torch.tensor(1.0)
    rows, noisy = [], []
    for i, t in enumerate(timesteps):  # float32, in diffusers' order of operations, so trajectories agree
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else one
        beta_t = 1 - ab_t / ab_prev  # beta of the respaced step
        a, b = 1 / ab_t ** 0.5, (1 - ab_t) ** 0.5 / ab_t ** 0.5  # x0_hat = a x_t - b eps
        zero = torch.tensor(0.0)
        if sampler == "ddpm":  # posterior mean; variance "fixed_large" = beta_t; no noise at t = 0
            c0 = ab_prev ** 0.5 * beta_t / (1 - ab_t)
            cx = (ab_t / ab_prev) ** 0.5 * (1 - ab_prev) / (1 - ab_t)
            ce, s = zero, beta_t ** 0.5 if t > 0 else zero
        else:  # DDIM (Song et al. eq. 12); eta = 0 is deterministic
            s = eta * ((1 - ab_prev) / (1 - ab_t) * beta_t) ** 0.5
            c0, cx, ce = ab_prev ** 0.5, zero, (1 - ab_prev - s ** 2) ** 0.5
        rows.append(torch.stack([a, b, c0, cx, ce, s]))
        noisy.append(bool(s > 0))
    alpha_bar_star = float(alpha_bar[t_star]) if alpha_bar_star is None else alpha_bar_star
    return Schedule(sampler, nfe, t_star, eta, timesteps, alpha_bar_star, torch.stack(rows), noisy)


def denoise_step(unet, x_t, t, z, coef):
    """One reverse step: the UNet's epsilon, then the (fused) DDPM/DDIM update; coef is the step's
    (a, b, c0, cx, ce, s), already on x_t's device."""
    eps = unet(x_t, torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long))
    return reverse_step(x_t, eps, z, *coef)


def diffuse(x, eps, alpha_bar):
    """Forward diffusion (paper eq. 2) of an image in [0, 1] to the model's [-1, 1] range."""
    return alpha_bar ** 0.5 * (2 * x - 1) + (1 - alpha_bar) ** 0.5 * eps


def ddpm_purify(unet, x, sched, noise=None, grad_checkpoint=False, trace=None):
    """DP_DDPM / DP_DDIM: image in [0, 1] -> purified image in [0, 1] (paper eqs. 2-3).
    noise: see the module docstring (draw 0 forward, then one draw per noisy reverse step).
    grad_checkpoint recomputes each UNet call in the backward pass, so memory grows with the number
    of steps by one image tensor per step only. trace: an optional list that receives x_t after the
    forward diffusion and after every step."""
    noise = as_noise(noise)
    x_t = diffuse(x, noise(0, x), sched.alpha_bar_star)
    coefs = sched.coefs.to(x.device)  # once: a host-to-device copy per step would stall the GPU
    if trace is not None:
        trace.append(x_t.detach())
    k = 1
    for i, t in enumerate(sched.timesteps):
        z = None
        if sched.noisy[i]:
            z, k = noise(k, x_t), k + 1
        if grad_checkpoint and torch.is_grad_enabled():
            x_t = checkpointed(grad_checkpoint, denoise_step, unet, x_t, t, z, coefs[i])
        else:
            x_t = denoise_step(unet, x_t, t, z, coefs[i])
        if trace is not None:
            trace.append(x_t.detach())
    return (x_t + 1) / 2


class Purifier:
    """purify(x, noise) of one family with its model and settings: what purify.py evaluates and attacks
    differentiate. `grad_checkpoint` is switched on by attacks (per network call): False, True or
    'selective' (see checkpointed)."""

    def __init__(self, family, sample, model, info, **settings):
        self.family, self.sample, self.model, self.info, self.settings = family, sample, model, info, settings
        self.grad_checkpoint = False

    def __call__(self, x, noise=None, trace=None):
        kw = {"trace": trace} if trace is not None else {}
        return self.sample(self.model, x, noise=noise, grad_checkpoint=self.grad_checkpoint, **self.settings, **kw)


def ddpm_purifier(unet, sched):
    info = {"family": sched.sampler, "nfe": sched.nfe, "t_star": sched.t_star, "eta": sched.eta,
            "timesteps": sched.timesteps, "model_calls": len(sched.timesteps)}
    return Purifier(sched.sampler, ddpm_purify, unet, info, sched=sched)


def ddpm_generate(unet, like, sched, noise=None):
    """Images in [0, 1] from pure noise (DDPMPipeline, DDIMPipeline) with a generation_schedule: draw 0 is x_T,
    then one draw per noisy step, as for purification; `like` gives only the shape and the device."""
    if sched.alpha_bar_star != 0:
        raise ValueError("ddpm_generate takes a generation_schedule (alpha_bar_star = 0: x_T is pure noise)")
    return ddpm_purify(unet, torch.zeros_like(like), sched, noise)


# ---------------------------------------------------------------- VP-SDE (DiffPure)

VPSDE_EPS = 1e-5  # DiffPure integrates the reverse SDE down to forward time 1e-5, not 0


def vpsde_t_index(t_star, T=T):
    """DiffPure's integer t, t* = t / T (its --t 100 is t* = 0.1)."""
    t = round(t_star * T)
    if not 0 < t < T or abs(t_star * T - t) > 1e-6:
        raise UserError(f"--t-star {t_star} must be a multiple of 1/{T} in (0, 1) for the VP-SDE "
                        f"(DiffPure's --t counts steps of 1/{T}, e.g. 0.1 = --t 100)")
    return t


def vpsde_times(t_star=0.1, dt=1e-3):
    """The Euler grid in torchsde time s (forward time tau = 1 - s) from 1 - t* to 1 - 1e-5, float32, built
    as torchsde's fixed-step loop builds it, s_{k+1} = min(fl32(s_k + dt), s_end): 100 steps for t* = 0.1,
    the last one shorter (0.00099128), and up to 1.3e-6 away from s_0 + k dt."""
    if not dt > 0:
        raise UserError(f"the VP-SDE step dt must be positive, got {dt}")
    s0, end = torch.tensor([1 - vpsde_t_index(t_star) / T, 1 - VPSDE_EPS])  # DiffPure: linspace(1 - t/T, 1 - 1e-5, 2)
    times = [s0]
    while times[-1] < end:
        times.append(torch.minimum(times[-1] + dt, end))
    return torch.stack(times)


def vpsde_beta_std(tau, beta_min=0.1, beta_max=20.0):
    """beta(tau) of the linear VP schedule (Song et al. 2021, eq. 11) and the std of x_tau given x_0
    (score_sde's VPSDE.marginal_prob), in its order of operations."""
    beta = beta_min + tau * (beta_max - beta_min)
    log_mean = -0.25 * tau ** 2 * (beta_max - beta_min) - 0.5 * tau * beta_min
    return beta, torch.sqrt(1.0 - torch.exp(2.0 * log_mean))


def vpsde_coefficients(times, beta_min=0.1, beta_max=20.0):
    """(steps, 6) float32: per step k, the network label 999 tau, std(tau), beta(tau) / 2, g^2 with
    g = sqrt(beta(tau)) the diffusion, dt_k = s_{k+1} - s_k and g sqrt(dt_k), all at tau = 1 - s_k, as
    DiffPure's RevVPSDE computes them."""
    s = times[:-1]
    dt = times[1:] - s
    tau = 1 - s
    beta, std = vpsde_beta_std(tau, beta_min, beta_max)
    g = torch.sqrt(beta)
    return torch.stack([tau * 999, std, 0.5 * beta, g ** 2, dt, g * dt.sqrt()], dim=1)


def vpsde_step(model, y, z, coef):
    """One Euler-Maruyama step of the reverse VP-SDE (Song et al. 2021, eq. 6) in torchsde time s:
    y + f(s, y) dt + g(s) sqrt(dt) z with f(s, y) = -(-beta y / 2 - g^2 score), score = -model(y, 999 tau) / std."""
    label, std, half_beta, g2, dt, g_sqrt_dt = coef
    score = -model(y, label.expand(y.shape[0])).to(y.dtype) / std
    return y + (half_beta * y + g2 * score) * dt + g_sqrt_dt * z


def langevin_alphas(labels, beta_min=0.1, beta_max=20.0):
    """score_sde's alpha of the VP Langevin corrector at network labels 999 tau: alphas[floor(999 tau)] with
    alphas = 1 - linspace(beta_min / T, beta_max / T, T) (its VPSDE.alphas, index (t (N - 1) / T).long())."""
    return 1.0 - torch.linspace(beta_min / T, beta_max / T, T, dtype=torch.float32)[labels.long()]


def langevin_step(model, y, z, coef, alpha, snr):
    """One Langevin corrector step at the predictor's time (Song et al. 2021, app. G; score_sde's
    LangevinCorrector as ADDT's step_correct runs it): step = 2 alpha (snr ||z|| / ||score||)^2,
    y + step score + sqrt(2 step) z. The norms are THIS image's (as ADDT's step_correct): score_sde averages
    them over the batch, which would make an image's purification depend on its batch neighbours."""
    label, std = coef[0], coef[1]
    score = -model(y, label.expand(y.shape[0])).to(y.dtype) / std
    ratio = snr * z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1)
    step = (ratio ** 2 * 2 * alpha).view(-1, *[1] * (y.dim() - 1))
    return y + step * score + (step * 2).sqrt() * z


CORRECTORS = [None, "langevin"]  # vpsde_purify's corrector: none (DiffPure) or the paper's extra Langevin corrector


def vpsde_purify(model, x, noise=None, t_star=0.1, beta_min=0.1, beta_max=20.0, dt=1e-3, grad_checkpoint=False,
                 trace=None, corrector=None, snr=0.16, corrector_steps=1):
    """DiffPure (Nie et al. 2022, eqs. 2-4) with a score_sde VP model (models/ncsnpp.py), as its
    RevGuidedDiffusion runs it: an image in [0, 1] -> x_0 = 2x - 1, diffused to t = t* T with the DISCRETE
    alpha_bar[t - 1] of the betas linspace(beta_min, beta_max) / T (DiffPure's forward step; the continuous
    one would differ), then the reverse VP-SDE from forward time t* down to 1e-5 with torchsde's fixed-step
    Euler-Maruyama (`sdeint(method='euler', dt=dt)`, the grid of vpsde_times), and (x_0 + 1) / 2.
    NOT clamped: DiffPure feeds its classifier exactly this, which can leave [0, 1].
    corrector="langevin" (the paper's "Extra Corrector", its appendix G) runs `corrector_steps` Langevin steps
    (langevin_step, signal-to-noise ratio snr) before each Euler step, at that step's time, as score_sde's
    PC sampler and ADDT's VP-SDE evaluation order them.
    noise: see the module docstring; draw 0 is the forward noise, draw 1 + k the standard normal z_k of
    step k, whose Brownian increment is dW_k = sqrt(dt_k) z_k (to replay torchsde's, pass dW_k / sqrt(dt_k));
    the corrector's draws come after all of these: draw 1 + steps + k corrector_steps + j is the noise of
    corrector step j before Euler step k.
    grad_checkpoint recomputes each network call in the backward pass. trace: an optional list that
    receives the state after the forward diffusion and after every (corrector and) Euler step (model space,
    [-1, 1] scale)."""
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {CORRECTORS}, not {corrector!r}")
    noise = as_noise(noise)
    alpha_bar = linear_alpha_bar(T, beta_min / T, beta_max / T)[vpsde_t_index(t_star) - 1]
    y = diffuse(x, noise(0, x), float(alpha_bar))
    table = vpsde_coefficients(vpsde_times(t_star, dt), beta_min, beta_max)
    coefs = table.to(x.device, x.dtype)  # once, no syncs
    alphas = langevin_alphas(table[:, 0], beta_min, beta_max).to(x.device, x.dtype) if corrector else None
    ckpt = grad_checkpoint and torch.is_grad_enabled()
    if trace is not None:
        trace.append(y.detach())
    for k, coef in enumerate(coefs):
        for j in range(corrector_steps if corrector else 0):
            z = noise(1 + len(coefs) + k * corrector_steps + j, y)
            if ckpt:
                y = checkpointed(grad_checkpoint, langevin_step, model, y, z, coef, alphas[k], snr)
            else:
                y = langevin_step(model, y, z, coef, alphas[k], snr)
        z = noise(1 + k, y)
        if ckpt:
            y = checkpointed(grad_checkpoint, vpsde_step, model, y, z, coef)
        else:
            y = vpsde_step(model, y, z, coef)
        if trace is not None:
            trace.append(y.detach())
    return (y + 1) / 2


def vpsde_purifier(model, t_star=0.1, beta_min=0.1, beta_max=20.0, dt=1e-3, corrector=None, snr=0.16,
                   corrector_steps=1):
    """DiffPure's defence around a score_sde NCSN++ (models/ncsnpp.load_score_sde); the defaults are its
    CIFAR-10 settings (--t 100, the Linf runs; its L2 runs use t* = 0.125). corrector="langevin" adds the
    paper's Extra Corrector (table 10; snr 0.16 and one step per Euler step, as score_sde and ADDT)."""
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {CORRECTORS}, not {corrector!r}")
    if corrector and not (snr > 0 and math.isfinite(snr) and corrector_steps >= 1):
        raise ValueError(f"the corrector needs snr > 0 and corrector_steps >= 1, not {snr} and {corrector_steps}")
    settings = dict(t_star=t_star, beta_min=beta_min, beta_max=beta_max, dt=dt)
    times = vpsde_times(t_star, dt)
    steps = len(times) - 1
    t = vpsde_t_index(t_star)
    info = {"family": "vpsde", "t_star": t, "beta_min": beta_min, "beta_max": beta_max, "dt": dt, "steps": steps,
            "alpha_bar_star": float(linear_alpha_bar(T, beta_min / T, beta_max / T)[t - 1]),
            "sde_times": [float(times[0]), float(times[-1])], "model_calls": steps, "noise_draws": 1 + steps}
    if corrector:
        settings.update(corrector=corrector, snr=snr, corrector_steps=corrector_steps)
        info.update(corrector=corrector, snr=snr, corrector_steps=corrector_steps,
                    model_calls=steps * (1 + corrector_steps), noise_draws=1 + steps * (1 + corrector_steps))
    return Purifier("vpsde", vpsde_purify, model, info, **settings)


def vpsde_generation_coefficients(steps=1000, eps=1e-3, beta_min=0.1, beta_max=20.0):
    """vpsde_step's rows for score_sde's sampler (Song et al. 2021; run_lib's pc sampler with its CIFAR-10 VP
    settings: EulerMaruyamaPredictor, no corrector, sampling eps 1e-3): tau_k = linspace(1, eps, steps) and
    dt = 1 / steps at every step (score_sde's dt = -1 / N, whatever the spacing of its grid)."""
    tau = torch.linspace(1.0, eps, steps, dtype=torch.float64)
    beta, std = vpsde_beta_std(tau, beta_min, beta_max)
    dt = torch.full_like(tau, 1 / steps)
    return torch.stack([tau * 999, std, 0.5 * beta, beta, dt, (beta * dt).sqrt()], dim=1).float()


def vpsde_generate(model, like, noise=None, steps=1000, eps=1e-3, beta_min=0.1, beta_max=20.0):
    """Images from the VP-SDE's prior x_1 = z (draw 0) by the reverse SDE's Euler-Maruyama steps (draw 1 + k is
    the z of step k); the last step adds no noise (score_sde's noise_removal returns its x_mean). (x + 1) / 2,
    not clamped (score_sde clips when it writes the images)."""
    noise = as_noise(noise)
    coefs = vpsde_generation_coefficients(steps, eps, beta_min, beta_max).to(like.device, like.dtype)
    y = noise(0, like)
    for k, coef in enumerate(coefs):
        z = noise(1 + k, y) if k < steps - 1 else torch.zeros_like(y)
        y = vpsde_step(model, y, z, coef)
    return (y + 1) / 2


# ---------------------------------------------------------------- EDM (ADDT's EDM purification)

def edm_schedule(sigma_max=0.5, num_steps=50, S_churn=6.0, S_min=0.01, S_max=0.46, S_noise=1.007,
                 sigma_min=0.002, rho=7.0):
    """The noise levels of EDM's stochastic sampler (Karras et al. 2022, eq. 5 and Algorithm 2) started at
    sigma_max: t_steps (N+1,) from sigma_max down to sigma_min, then 0; gamma (N,), the churn of step i,
    on where S_min <= t_cur <= S_max; t_hat = t_cur + gamma t_cur; churn = sqrt(t_hat^2 - t_cur^2) S_noise,
    the std of the noise step i adds. CPU float32 in the official order of operations (ADDT's
    sampler/edm.py works in float32, where EDM's generate.py uses float64), so they equal ADDT's bit for bit."""
    if num_steps < 2:
        raise UserError(f"EDM purification needs at least 2 steps (the schedule divides by N - 1), got {num_steps}")
    if not sigma_max > sigma_min > 0:
        raise UserError(f"EDM purification needs sigma_max > sigma_min > 0, got {sigma_max} and {sigma_min}")
    i = torch.arange(num_steps, dtype=torch.float32)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1)])  # t_N = 0
    t_cur = t_steps[:-1]
    gamma = torch.where((S_min <= t_cur) & (t_cur <= S_max), min(S_churn / num_steps, math.sqrt(2) - 1), 0.0)
    t_hat = t_cur + gamma * t_cur
    churn = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise
    return t_steps, gamma, t_hat, churn


def heun_step(net, x_hat, t_hat, t_next, second_order):
    """EDM Algorithm 2, lines 7-10: an Euler step from x_hat at t_hat to t_next, then the trapezoidal
    (2nd order) correction, which the last step (t_next = 0) skips."""
    d_cur = (x_hat - net(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if second_order:
        d_prime = (x_next - net(x_next, t_next)) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm_purify(net, x, noise=None, sigma_max=0.5, num_steps=50, S_churn=6.0, S_min=0.01, S_max=0.46, S_noise=1.007,
               sigma_min=0.002, rho=7.0, grad_checkpoint=False, trace=None):
    """ADDT's EDM purification (EDMStochasticSampler.purify; purify_lock with replayed draws): an image in
    [0, 1] -> 2x - 1, plus noise of std sigma_max (VE style: the image is not scaled), then EDM's stochastic
    Heun sampler from sigma_max to 0 (2 num_steps - 1 calls of the denoiser `net(x, sigma)`), and back to
    [0, 1], clamped. S_churn = 0 is the deterministic (EDM-ODE) variant.
    noise: see the module docstring; draw 0 is the forward noise and draw 1 + i the churn noise of step i,
    taken at every step even where gamma = 0 (as the official code does), so the indices never shift.
    grad_checkpoint recomputes each step's denoiser calls in the backward pass (one image kept per step).
    trace: an optional list that receives x after the forward noise, then x_hat_i and x_{i+1} of every
    step i, in [-1, 1] before the clamp: x_hat_i = trace[1 + 2 i], x_{i+1} = trace[2 + 2 i]."""
    noise = as_noise(noise)
    t_steps, _, t_hat, churn = edm_schedule(sigma_max, num_steps, S_churn, S_min, S_max, S_noise, sigma_min, rho)
    t_steps, t_hat, churn = t_steps.to(x.device), t_hat.to(x.device), churn.to(x.device)  # once, not per step
    x = (2 * x - 1) + noise(0, x) * sigma_max
    if trace is not None:
        trace.append(x.detach())
    for i in range(num_steps):
        x_hat = x + churn[i] * noise(1 + i, x)
        args = (net, x_hat, t_hat[i], t_steps[i + 1], i < num_steps - 1)
        if grad_checkpoint and torch.is_grad_enabled():
            x = checkpointed(grad_checkpoint, heun_step, *args)
        else:
            x = heun_step(*args)
        if trace is not None:
            trace.extend([x_hat.detach(), x.detach()])
    return ((x + 1) / 2).clamp(0, 1)


def edm_purifier(net, sigma_max=0.5, num_steps=50, S_churn=6.0, S_min=0.01, S_max=0.46, S_noise=1.007,
                 sigma_min=0.002, rho=7.0):
    """ADDT's EDM defence around the denoiser `net` (models/edm.py); the defaults are those of ADDT's
    script_edm_sde/edm_run_*.sh (t* = sigma_max = 0.5, 50 steps, churn 6)."""
    settings = dict(sigma_max=sigma_max, num_steps=num_steps, S_churn=S_churn, S_min=S_min, S_max=S_max,
                    S_noise=S_noise, sigma_min=sigma_min, rho=rho)
    t_steps, gamma, _, _ = edm_schedule(**settings)
    info = {"family": "edm", "variant": "sde" if S_churn > 0 else "ode", "sigma_max": sigma_max, "steps": num_steps,
            "S_churn": S_churn, "S_min": S_min, "S_max": S_max, "S_noise": S_noise, "sigma_min": sigma_min, "rho": rho,
            "t_steps": t_steps.tolist(), "churn_steps": int((gamma > 0).sum()), "model_calls": 2 * num_steps - 1}
    return Purifier("edm", edm_purify, net, info, **settings)


def edm_generate(net, like, noise=None, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Images from x_T = sigma_max z (draw 0) by EDM's deterministic Heun sampler, the defaults of NVlabs/edm's
    generate.py (18 steps, 35 calls, S_churn 0): edm_purify of the all-0.5 image (2 x - 1 = 0) without churn.
    sigma_min and sigma_max are clipped to the network's range as edm_sampler does. The ODE state is float32
    (edm_sampler keeps it in float64)."""
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", math.inf)))
    return edm_purify(net, torch.full_like(like, 0.5), noise, sigma_max=sigma_max, num_steps=num_steps, S_churn=0.0,
                      S_min=0.0, S_max=math.inf, S_noise=1.0, sigma_min=sigma_min, rho=rho)


# ---------------------------------------------------------------- GDMP (Wang et al. 2022, guided DDPM purification)

# GDMP's CIFAR-10 settings (github.com/JinyiW/GuidedDiffusionPur: configs/cifar10_MSE.yml, configs/default.yml)
GDMP_T_STAR = 0.036  # purify_step: 36
GDMP_ITERS = 4  # max_iter: diffuse and denoise 4 times, always guided toward the input
GDMP_SCALE = {"mse": 60000.0, "ssim": 70000.0}  # guide_scale of the MSE config and of the SSIM one
GDMP_PTB = 8 / 255  # attack.ptb (8, in pixel units) enters its scale: m = 2 ptb / 3 / guide_scale
GDMP_BATCH = 100  # structure.bsize: its losses average over a batch of 100 images (see gdmp_guide_coefs)
GUIDANCE = ("none", "mse", "ssim")


def gdmp_steps(t_star, T=T):
    """GDMP's purify_step n = t* T: it must be a whole number of steps, at least 2."""
    n = round(t_star * T)
    if not 2 <= n < T or abs(t_star * T - n) > 1e-6:
        raise UserError(f"--t-star {t_star} must be a multiple of 1/{T} in [2/{T}, 1) for GDMP (its purify_step "
                        f"counts steps of 1/{T}: 0.036 = 36 steps)")
    return n


def gdmp_schedule(t_star=GDMP_T_STAR, T=T):
    """GDMP's chain in its pytorch_diffusion indexing: diffuse with alpha_bar[n] (n = t* T), then the n DDPM
    steps t = n-1, ..., 0 (fixed_large variance, clipped x0_hat): DP_DDPM's step, one step shallower than
    DP_DDPM's t*..0."""
    n = gdmp_steps(t_star, T)
    sched = make_schedule("ddpm", n - 1, (n - 1) / T, T=T)
    return replace(sched, nfe=n, t_star=n, alpha_bar_star=float(linear_alpha_bar(T)[n]))


def gdmp_guide_coefs(sched, guide_scale, batch=GDMP_BATCH, T=T):
    """(steps, 3) float32, per reverse step at t: sqrt(alpha_bar[t]) and sqrt(1 - alpha_bar[t]), which diffuse
    the input to the guidance target y_t, and k_t, the factor of grad D(x_t, y_t) on the step's mean:
    k_t = var_t * s_t / batch, with var_t GDMP's fixed_large variance (beta_t; at t = 0 the posterior variance
    of t = 1) and s_t = sqrt(1 - alpha_bar[t]) / (m sqrt(alpha_bar[t])), m = 2 ptb / 3 / guide_scale (its
    compute_scale). GDMP's losses average over its batch of 100 images, which divides each image's gradient
    by 100; `batch` does that here per image, so an image's purification never depends on its batch."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    t = torch.tensor(sched.timesteps)
    post_var_1 = betas[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1])
    var = torch.where(t > 0, betas[t], post_var_1)
    ab = alpha_bar[t]
    m = 2 * GDMP_PTB / 3 / guide_scale
    k = var * (1 - ab).sqrt() / (m * ab.sqrt()) / batch
    ab32 = linear_alpha_bar(T)[t]  # the target's diffusion as DP_DDPM's (float32)
    return torch.stack([ab32.sqrt(), (1 - ab32).sqrt(), k.float()], dim=1)


def gaussian_window(size=11, sigma=1.5):
    """GDMP's SSIM window (pytorch_ssim): the normalised 1-D Gaussian's outer product, (size, size)."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _local_means(x, window):
    """The window's weighted mean around every pixel, per channel, zero padded (F.conv2d, padding size // 2)."""
    w = window.to(x.device, x.dtype).expand(x.shape[1], 1, *window.shape)
    return torch.nn.functional.conv2d(x, w, padding=window.shape[-1] // 2, groups=x.shape[1])


def _ssim_terms(x, y, window, C1=0.01 ** 2, C2=0.03 ** 2):
    """SSIM's map S = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)) with its
    numerator and denominator factors (Wang et al. 2004 eq. 13; pytorch_ssim's constants, on [-1, 1] images)."""
    mu_x, mu_y = _local_means(x, window), _local_means(y, window)
    s_x = _local_means(x * x, window) - mu_x ** 2
    s_y = _local_means(y * y, window) - mu_y ** 2
    s_xy = _local_means(x * y, window) - mu_x * mu_y
    A1, A2 = 2 * mu_x * mu_y + C1, 2 * s_xy + C2
    B1, B2 = mu_x ** 2 + mu_y ** 2 + C1, s_x + s_y + C2
    return A1 * A2 / (B1 * B2), mu_x, mu_y, A1, A2, B1, B2


def ssim(x, y, window=None):
    """Per image: the mean of the SSIM map over channels and pixels (GDMP's pytorch_ssim.ssim for one image)."""
    window = gaussian_window() if window is None else window
    return _ssim_terms(x, y, window)[0].flatten(1).mean(1)


def ssim_grad(x, y, window=None):
    """d ssim(x, y)[b] / d x[b] in closed form: with S = A1 A2 / (B1 B2) a function of the local moments
    mu_x = w*x, E_xx = w*(x x), E_xy = w*(x y), chain rule through each (the zero-padded window is its own
    adjoint, being symmetric): dS/dmu_x = 2 mu_y (A2 - A1) / (B1 B2) - 2 mu_x S (1/B1 - 1/B2),
    dS/dE_xx = -S / B2, dS/dE_xy = 2 A1 / (B1 B2). Plain differentiable ops, so an attack's gradient through
    it is exact without double backward."""
    window = gaussian_window() if window is None else window
    S, mu_x, mu_y, A1, A2, B1, B2 = _ssim_terms(x, y, window)
    d_mu = 2 * mu_y * (A2 - A1) / (B1 * B2) - 2 * mu_x * S * (1 / B1 - 1 / B2)
    d_exx, d_exy = -S / B2, 2 * A1 / (B1 * B2)
    grad = _local_means(d_mu, window) + 2 * x * _local_means(d_exx, window) + y * _local_means(d_exy, window)
    return grad / x[0].numel()


def guidance_grad(guidance, x, y):
    """grad_x D(x, y) per image: D = -MSE(x, y) (the mean over the image) or SSIM(x, y). Computed in fp32 (or
    fp64) even under autocast: SSIM's constants (C1 = 1e-4) are below bf16's resolution."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, y = x.to(dtype), y.to(dtype)
        if guidance == "mse":
            return -2 * (x - y) / x[0].numel()
        return ssim_grad(x, y)


def gdmp_step(unet, x_t, t, z, coef, y_t, k_t, guidance):
    """GDMP's guided reverse step: DP_DDPM's step (the UNet's posterior mean plus the step's noise), with
    k_t grad D(x_t, y_t) added to the mean (GDMP's denoising_step with cond_fn)."""
    x_prev = denoise_step(unet, x_t, t, z, coef)
    if guidance == "none":
        return x_prev
    return x_prev + (k_t * guidance_grad(guidance, x_t, y_t)).to(x_prev.dtype)


def gdmp_purify(unet, x, sched, noise=None, guidance="mse", guide=None, iters=GDMP_ITERS, grad_checkpoint=False,
                trace=None):
    """GDMP (Wang et al. 2022; its code's diff_purify): an image in [0, 1] -> x_adv = 2x - 1; `iters`
    times: diffuse the current image with alpha_bar[t*] (the first time x_adv, then the last result), and
    run the reverse DDPM steps of `sched` (gdmp_schedule) guided toward y_t, the input x_adv diffused to step
    t with fresh noise; finally (x + 1) / 2 clamped to [0, 1]. guidance: none (unguided), mse or ssim; guide:
    gdmp_guide_coefs(sched, scale). Differentiable end to end: the target y_t moves with the input too.
    noise: see the module docstring; draw 0 is the first forward noise; then, in order, per step the
    target's noise (guided only) and the step's noise (t > 0), and each later iteration's forward noise
    before its steps. grad_checkpoint recomputes each step (its UNet call and guidance) in the backward.
    trace: an optional list that receives x_t after every forward diffusion and after every step."""
    noise = as_noise(noise)
    x_adv = 2 * x - 1
    coefs = sched.coefs.to(x.device)  # once: no host-to-device copy per step
    if guidance != "none":
        guide = guide.to(x.device, x.dtype)
    x_0, k = x_adv, 0
    for _ in range(iters):
        x_t = sched.alpha_bar_star ** 0.5 * x_0 + (1 - sched.alpha_bar_star) ** 0.5 * noise(k, x)
        k += 1
        if trace is not None:
            trace.append(x_t.detach())
        for i, t in enumerate(sched.timesteps):
            y_t = k_t = z = None
            if guidance != "none":
                y_t, k_t, k = guide[i, 0] * x_adv + guide[i, 1] * noise(k, x), guide[i, 2], k + 1
            if sched.noisy[i]:
                z, k = noise(k, x_t), k + 1
            args = (unet, x_t, t, z, coefs[i], y_t, k_t, guidance)
            if grad_checkpoint and torch.is_grad_enabled():
                x_t = checkpointed(grad_checkpoint, gdmp_step, *args)
            else:
                x_t = gdmp_step(*args)
            if trace is not None:
                trace.append(x_t.detach())
        x_0 = x_t
    return ((x_0 + 1) / 2).clamp(0, 1)


def gdmp_purifier(unet, guidance="mse", guide_scale=None, t_star=GDMP_T_STAR, iters=GDMP_ITERS, batch=GDMP_BATCH):
    """GDMP's defence around a DDPM UNet; the defaults are its CIFAR-10 configs (t* = 36 steps, 4 iterations,
    guide_scale 60000 for MSE and 70000 for SSIM; see README "GDMP")."""
    if guidance not in GUIDANCE:
        raise UserError(f"unknown GDMP guidance {guidance!r}: use one of {', '.join(GUIDANCE)}")
    if not isinstance(iters, int) or iters < 1:
        raise UserError(f"GDMP needs at least one iteration, got {iters}")
    sched = gdmp_schedule(t_star)
    scale = None if guidance == "none" else GDMP_SCALE[guidance] if guide_scale is None else guide_scale
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise UserError(f"the GDMP guidance scale must be positive, got {scale}")
    guide = gdmp_guide_coefs(sched, scale, batch) if scale is not None else None
    per_iter = 1 + len(sched.timesteps) * (guidance != "none") + sched.n_noise
    info = {"family": "gdmp", "guidance": guidance, "guide_scale": scale, "guide_batch": batch, "t_star": sched.t_star,
            "iters": iters, "timesteps": sched.timesteps, "model_calls": iters * len(sched.timesteps),
            "noise_draws": iters * per_iter}
    return Purifier("gdmp", gdmp_purify, unet, info, sched=sched, guidance=guidance, guide=guide, iters=iters)


# ---------------------------------------------------------------- loading and saving the models of every family

# what our DDPM/DDIM samplers implement; a diffusers pipeline's scheduler_config.json must agree
SCHEDULER_EXPECTED = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                      "prediction_type": "epsilon", "clip_sample": True, "trained_betas": None, "thresholding": False,
                      "timestep_spacing": "leading", "steps_offset": 0, "clip_sample_range": 1.0}


def check_scheduler_config(path):
    """A pipeline directory (DIR/scheduler/scheduler_config.json) may describe a schedule our samplers do
    not implement (cosine betas, v-prediction, ...): refuse it instead of purifying with the wrong one."""
    cfg_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(cfg_path):
        return
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{cfg_path} is not valid JSON") from None
    wrong = [f"{k}={cfg[k]!r} (we implement {v!r})" for k, v in SCHEDULER_EXPECTED.items()
             if k in cfg and not (cfg[k] == v or isinstance(v, float) and isinstance(cfg[k], (int, float))
                                  and math.isclose(cfg[k], v, rel_tol=1e-9))]
    if cfg.get("variance_type", "fixed_large") not in ("fixed_large", "fixed_small"):
        wrong.append(f"variance_type={cfg['variance_type']!r}")
    if wrong:
        raise UserError(f"{path}: its scheduler uses settings our DDPM/DDIM samplers do not implement: "
                        f"{', '.join(wrong)}; purification here is the linear 1e-4..0.02 schedule over 1000 steps, "
                        "epsilon prediction, clipped x0 (SPEC.md)")


def load_unet(path, **overrides):
    """The diffusers-layout UNet at `path` (a UNet folder or a pipeline folder, whose scheduler config
    is checked), with a clear error when it is missing, unreadable or mismatched."""
    from models.unet import UNet
    hint = ("pass --ddpm DIR holding config.json + diffusion_pytorch_model.safetensors (for example the "
            "google/ddpm-cifar10-32 repository from https://huggingface.co/google/ddpm-cifar10-32, or the "
            "export of train_addt.py, which also trains one from scratch with --init scratch)")
    if not path:
        raise UserError(f"no diffusion model given: {hint}")
    if os.path.isdir(path):
        check_scheduler_config(path)
    try:
        return UNet.from_pretrained(path, **overrides)
    except FileNotFoundError as e:
        raise UserError(f"{e}; {hint}") from None
    except ValueError as e:
        raise UserError(f"diffusion model {path}: {e}") from None


# --defense -> its model flag
FAMILY_FLAGS = {"ddpm": "ddpm", "ddim": "ddpm", "vpsde": "vpsde", "edm": "edm", "gdmp": "ddpm"}


def _find(path, patterns, what):
    """path itself, or the one file in the folder `path` matching the patterns (a train_addt.py export)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"{what} not found: {path}")
    import glob
    found = []
    for p in patterns:  # the first pattern that matches anything decides
        found = found or sorted(glob.glob(os.path.join(glob.escape(path), p)))
    if len(found) != 1:
        raise UserError(f"{path}: expected one {what} ({' or '.join(patterns)}) in the folder, found {len(found)}")
    return found[0]


def load_diffusion_model(family, path):
    """The pretrained model of a family, in eval mode on the CPU: ddpm/ddim a diffusers UNet folder, vpsde a
    score_sde checkpoint (EMA weights, as DiffPure), edm an EDM pickle or the ADDT authors' .pth export;
    a train_addt.py export folder works for each. One-line errors for missing or bad files."""
    family = FAMILY_FLAGS[family]
    if not path:
        raise UserError(f"no diffusion model given: pass --{family} PATH")
    try:
        if family == "ddpm":
            return load_unet(path)
        if family == "vpsde":
            from models.ncsnpp import load_score_sde
            return load_score_sde(_find(path, ["checkpoint*.pth", "*.pth"], "score_sde checkpoint"))
        from models.edm import load_edm
        return load_edm(_find(path, ["*.pkl", "*.pth"], "EDM network pickle or .pth"))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f"diffusion model {path}: {e}") from None


def new_diffusion_model(family, config=None):
    """Random weights of a family's architecture (its paper config when config is None)."""
    if family == "vpsde":
        from models.ncsnpp import NCSNpp
        return NCSNpp(config)
    from models.edm import new_edm
    return new_edm(config)


def score_sde_checkpoint(model, sd, step):
    """score_sde's checkpoint layout, as its utils.save_checkpoint writes it and DiffPure's (score_sde's)
    restore_checkpoint reads it: optimizer (an Adam state dict over the model's parameters, score_sde's
    settings, no moments), model (names with DataParallel's `module.`), ema ({decay, num_updates,
    shadow_params}: the weights, in parameter order) and step. The weights are both the model and its EMA."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    return {"optimizer": opt.state_dict(), "model": {f"module.{k}": v for k, v in sd.items()},
            "ema": {"decay": 0.9999, "num_updates": step,
                    "shadow_params": [p.detach().cpu().clone() for p in model.parameters()]},
            "step": step}


def save_diffusion_model(family, model, folder, step=0):
    """Write the weights in the family's own format: a diffusers DDPMPipeline folder (ddpm), a score_sde
    checkpoint.pth with the weights as its EMA (vpsde: DiffPure and load_diffusion_model read it), the
    ADDT authors' state-dict .pth (edm); each with the config beside it."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if family == "ddpm":
        model.save_pretrained(os.path.join(folder, "unet"))
        scheduler = {"_class_name": "DDPMScheduler", "variance_type": "fixed_large", **SCHEDULER_EXPECTED}
        for name, obj in (("scheduler/scheduler_config.json", scheduler),
                          ("model_index.json", {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                                                "unet": ["diffusers", "UNet2DModel"]})):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                json.dump(obj, f, indent=2)
        return
    if family == "vpsde":
        torch_save(score_sde_checkpoint(model, sd, step), os.path.join(folder, "checkpoint.pth"))
    else:
        torch_save(sd, os.path.join(folder, "edm-ema.pth"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)


# ---------------------------------------------------------------- the flags purify.py and attack.py share

DEFENSES = ["ddpm", "ddim", "vpsde", "edm", "gdmp"]
# flags that belong to some families only: --flag -> the defences it applies to
FAMILY_ONLY = {"nfe": ("ddpm", "ddim", "vpsde"), "t_star": ("ddpm", "ddim", "vpsde", "gdmp"), "eta": ("ddim",),
               "sigma_max": ("edm",), "edm_steps": ("edm",), "s_churn": ("edm",), "corrector": ("vpsde",),
               "snr": ("vpsde",), "corrector_steps": ("vpsde",), "guidance": ("gdmp",),
               "guide_scale": ("gdmp",), "gdmp_iters": ("gdmp",)}
GDMP_FLAGS = ("guidance", "guide_scale", "gdmp_iters")  # added where "gdmp" is among the defences


def add_purification_args(p, defenses=DEFENSES):
    """The flags purify.py and attack.py share: defence and models, classifier, data, schedule, speed."""
    p.add_argument("--defense", choices=defenses, default="ddpm",
                   help="DP_DDPM, DP_DDIM, DiffPure's VP-SDE (DDPM++), ADDT's EDM purification or GDMP (DDPM, guided)")
    p.add_argument("--ddpm", help="diffusers UNet or DDPMPipeline folder (e.g. google/ddpm-cifar10-32), ddpm/ddim")
    p.add_argument("--vpsde", help="score_sde checkpoint (DiffPure's checkpoint_8.pth) or a train_addt export")
    p.add_argument("--edm", help="EDM pickle (edm-cifar10-32x32-uncond-vp.pkl), ADDT .pth or a train_addt export")
    p.add_argument("--classifier", help="classifier checkpoint: ours, RobustBench, wide-resnet.pytorch .t7, HF ViT")
    p.add_argument("--arch", default=None, help="classifier arch for a bare state dict (default: from its keys)")
    p.add_argument("--classifier-norm", default=None,
                   help="none | cifar10 | cifar100 | M1,M2,M3/S1,S2,S3 (default: the checkpoint family's)")
    p.add_argument("--data", default="cifar10", help="data set name or path (see addt_data.py)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=1024,
                   help="first N images of the split (write --num-images under torchrun, which takes --n as its own)")
    p.add_argument("--nfe", type=int, default=None, help="paper's NFE (default 100 ddpm, 10 ddim); vpsde: Euler "
                   "steps (default: dt = 1e-3, DiffPure's grid)")
    p.add_argument("--t-star", type=float, default=None, help="diffusion depth as a fraction of T (default 0.1; "
                   "gdmp 0.036, its 36 steps)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0 = deterministic reverse)")
    p.add_argument("--sigma-max", type=float, default=None, help="edm: t* in sigma units (default 0.5)")
    p.add_argument("--edm-steps", type=int, default=None, help="edm: reverse steps (default 50; 2 x steps - 1 calls)")
    p.add_argument("--s-churn", type=float, default=None, help="edm: S_churn (default 6 = EDM-SDE; 0 = EDM-ODE)")
    p.add_argument("--corrector", choices=["none", "langevin"], default=None,
                   help="vpsde: none (default: DiffPure, Euler-Maruyama only) or langevin (the paper's Extra "
                   "Corrector, table 10: a Langevin step before each Euler step, 2x the network calls)")
    p.add_argument("--snr", type=float, default=None, help="vpsde --corrector langevin: signal-to-noise ratio "
                   "(default 0.16, score_sde's and ADDT's)")
    p.add_argument("--corrector-steps", type=int, default=None,
                   help="vpsde --corrector langevin: Langevin steps per Euler step (default 1)")
    if "gdmp" in defenses:
        p.add_argument("--guidance", choices=GUIDANCE, default=None,
                       help="gdmp: guidance toward the input at every reverse step (default mse, table 1's GDMP)")
        p.add_argument("--guide-scale", type=float, default=None,
                       help="gdmp: GDMP's guide_scale (default 60000 mse, 70000 ssim; for its batch of 100: README)")
        p.add_argument("--gdmp-iters", type=int, default=None, help="gdmp: diffuse-and-denoise iterations (default 4)")
    p.add_argument("--seed", type=int, default=0)
    add_speed_args(p)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")


def add_speed_args(p):
    """--fast and the settings it stands for (purify.py, attack.py, analyze.py, train_addt.py)."""
    p.add_argument("--fast", action="store_true", help="the fast path in one flag: bf16 autocast on CUDA, "
                   "channels_last, torch.compile (attack.py: also --grad-checkpoint on, --chunk auto); each "
                   "setting's own flag overrides it (e.g. --fast --precision fp32)")
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default=None,
                   help="fp32 as the official code (default); bf16 autocast is the fast path (auto: bf16 on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the networks")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode (implies --compile; reduce-overhead adds CUDA graphs)")


def check_speed_args(args):
    """Fill the settings --fast stands for (each one's own flag wins): bf16 on CUDA (fp32 on the CPU, where
    bf16 gains little), channels_last and compile. Without --fast everything is the official fp32 eager."""
    from addt_common import require
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision is None:
        args.precision = "bf16" if args.fast and device.type == "cuda" else "fp32"
    args.channels_last = args.fast if args.channels_last is None else args.channels_last
    require(args.compile is not False or args.compile_mode is None,
            "--compile-mode needs compilation: drop --no-compile")
    args.compile = bool(args.fast or args.compile_mode) if args.compile is None else args.compile
    args.compile_mode = (args.compile_mode or "default") if args.compile else None


def speed_settings(args, precision=None):
    """The resolved speed settings of a run, for its printout and records."""
    return {"fast": bool(getattr(args, "fast", False)), "precision": precision or args.precision,
            "channels_last": bool(args.channels_last), "compile": args.compile_mode if args.compile else False}


def check_purification_args(args):
    """Defaults per defence and every shared flag checked before anything is loaded."""
    from addt_common import check_device, check_positive, check_range, require
    model_flags = {f: tuple(d for d, m in FAMILY_FLAGS.items() if m == f) for f in set(FAMILY_FLAGS.values())}
    for flag, families in {**FAMILY_ONLY, **model_flags}.items():
        if flag in GDMP_FLAGS and not hasattr(args, "gdmp_iters"):  # analyze.py rbgm-ranks: --guidance is CGPO's
            continue
        if getattr(args, flag) is not None and args.defense not in families:
            raise UserError(f"--{flag.replace('_', '-')} applies to --defense {' / '.join(families)}, "
                            f"not {args.defense}")
    if args.defense in DEFAULT_NFE and args.nfe is None:  # ddpm, ddim (vpsde: dt = 1e-3 unless --nfe; none: -)
        args.nfe = DEFAULT_NFE[args.defense]
    if args.t_star is None and args.defense in FAMILY_ONLY["t_star"]:
        args.t_star = GDMP_T_STAR if args.defense == "gdmp" else 0.1
    args.eta = 0.0 if args.eta is None and args.defense == "ddim" else args.eta
    if args.defense == "edm":
        args.sigma_max = 0.5 if args.sigma_max is None else args.sigma_max
        args.edm_steps = 50 if args.edm_steps is None else args.edm_steps
        args.s_churn = 6.0 if args.s_churn is None else args.s_churn
    if args.defense == "vpsde":
        args.corrector = args.corrector or "none"
        for flag in ("snr", "corrector_steps"):
            require(args.corrector == "langevin" or getattr(args, flag) is None,
                    f"--{flag.replace('_', '-')} applies to --corrector langevin only")
        if args.corrector == "langevin":
            args.snr = 0.16 if args.snr is None else args.snr
            args.corrector_steps = 1 if args.corrector_steps is None else args.corrector_steps
    if args.defense == "gdmp":
        args.guidance = "mse" if args.guidance is None else args.guidance
        require(args.guidance != "none" or args.guide_scale is None, "--guide-scale applies to --guidance mse / ssim")
        if args.guidance != "none" and args.guide_scale is None:
            args.guide_scale = GDMP_SCALE[args.guidance]
        args.gdmp_iters = GDMP_ITERS if args.gdmp_iters is None else args.gdmp_iters
        check_positive(args, "guide_scale", "gdmp_iters")
    check_positive(args, "n", "nfe", "edm_steps", "sigma_max", "snr", "corrector_steps")
    check_range(args, "t_star", 0, 1, lo_open=True, hi_open=True)
    check_range(args, "eta", 0, 1)
    check_range(args, "s_churn", 0, math.inf, hi_open=True)
    require(args.seed >= 0, f"--seed must be non-negative, not {args.seed}")
    if args.classifier_norm is not None:
        from models import parse_norm
        parse_norm(args.classifier_norm)
    check_device(args.device)
    check_speed_args(args)
    if args.defense in DEFENSES:
        build_purifier(args, None)  # the schedule (--nfe vs --t-star, EDM's steps) is checked before any loading


def build_purifier(args, model):
    """The Purifier of --defense around its loaded model, with the flags' settings."""
    if args.defense in ("ddpm", "ddim"):
        return ddpm_purifier(model, make_schedule(args.defense, args.nfe, args.t_star, args.eta or 0.0))
    if args.defense == "vpsde":
        dt = 1e-3 if args.nfe is None else args.t_star / args.nfe
        corrector = {"langevin": dict(corrector="langevin", snr=args.snr, corrector_steps=args.corrector_steps)}
        return vpsde_purifier(model, t_star=args.t_star, dt=dt, **corrector.get(args.corrector, {}))
    if args.defense == "gdmp":
        return gdmp_purifier(model, args.guidance, args.guide_scale, args.t_star, args.gdmp_iters)
    return edm_purifier(model, sigma_max=args.sigma_max, num_steps=args.edm_steps, S_churn=args.s_churn)


def model_image_size(model):
    """(H, W) a diffusion model of any family was made for (its config), or None when it does not say."""
    config = getattr(model, "config", None) or {}
    size = next((config[k] for k in ("sample_size", "image_size", "img_resolution") if config.get(k)), None)
    return None if size is None else (size, size) if isinstance(size, int) else tuple(size)


def check_models_fit(data, source, model, model_path, classifier, classifier_path):
    """The one check of a data set against the models of a run (every script makes it before any work):
    the diffusion model's image size, the classifier's classes and, when its checkpoint says, the size
    of the images it was trained on. model and classifier may be None."""
    if model is not None:
        check_fits(data, source, f"the diffusion model {model_path}", size=model_image_size(model))
    if classifier is not None:
        what = f"classifier checkpoint {classifier_path}"
        check_fits(data, source, what, size=classifier.input_size, num_classes=classifier.net.num_classes)


def load_inputs(args, device, defended=True):
    """Diffusion model (None when undefended), classifier and the first N images, checked against each
    other; the files named on the command line are read before the data set (which may be downloaded)."""
    if not args.classifier:
        raise UserError("no classifier given: pass --classifier CKPT (train one with train_classifier.py; "
                        "`python attack.py --preset smoke` checks an install without one)")
    model_path = getattr(args, FAMILY_FLAGS[args.defense]) if defended else None
    model = load_diffusion_model(args.defense, model_path) if defended else None
    classifier = load_classifier(args.classifier, arch=args.arch, norm=args.classifier_norm)
    data = load_split(args.data, args.split)
    if args.n > len(data.labels):
        raise UserError(f"--n {args.n} but {args.data} {args.split} holds {len(data.labels)} images")
    check_models_fit(data, f"--data {args.data}", model, model_path, classifier, args.classifier)
    if model is not None:
        model = prepare(args, model, device)
    return model, prepare(args, classifier, device), data.images[:args.n], data.labels[:args.n]


def prepare(args, model, device):
    """A network on the device with the run's --channels-last and --compile (--compile-mode)."""
    return prepare_model(model, device, args.channels_last, args.compile and args.compile_mode)
