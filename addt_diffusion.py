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
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from addt_common import COMPILE_MODES, UserError, keyed_normal, load_kernel, prepare_model
from addt_data import load_split
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


def _keep_costly(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(mode, fn, *args):
    """fn(*args) under torch's non-reentrant activation checkpointing: mode True recomputes the whole call
    in the backward pass (memory: the call's inputs only), 'selective' keeps the outputs of SAVED_OPS and
    recomputes the rest (less recomputation, more memory). Gradients equal plain autograd's."""
    if mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(_keep_costly))
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
    timesteps = respaced_timesteps(nfe, t_star_int, T)
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
    return Schedule(sampler, nfe, t_star_int, eta, timesteps, float(alpha_bar[t_star_int]),
                    torch.stack(rows), noisy)


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


def vpsde_purify(model, x, noise=None, t_star=0.1, beta_min=0.1, beta_max=20.0, dt=1e-3, grad_checkpoint=False,
                 trace=None):
    """DiffPure (Nie et al. 2022, eqs. 2-4) with a score_sde VP model (models/ncsnpp.py), as its
    RevGuidedDiffusion runs it: an image in [0, 1] -> x_0 = 2x - 1, diffused to t = t* T with the DISCRETE
    alpha_bar[t - 1] of the betas linspace(beta_min, beta_max) / T (DiffPure's forward step; the continuous
    one would differ), then the reverse VP-SDE from forward time t* down to 1e-5 with torchsde's fixed-step
    Euler-Maruyama (`sdeint(method='euler', dt=dt)`, the grid of vpsde_times), and (x_0 + 1) / 2.
    NOT clamped: DiffPure feeds its classifier exactly this, which can leave [0, 1].
    noise: see the module docstring; draw 0 is the forward noise, draw 1 + k the standard normal z_k of
    step k, whose Brownian increment is dW_k = sqrt(dt_k) z_k (to replay torchsde's, pass dW_k / sqrt(dt_k)).
    grad_checkpoint recomputes each network call in the backward pass. trace: an optional list that
    receives the state after the forward diffusion and after every step (model space, [-1, 1] scale)."""
    noise = as_noise(noise)
    alpha_bar = linear_alpha_bar(T, beta_min / T, beta_max / T)[vpsde_t_index(t_star) - 1]
    y = diffuse(x, noise(0, x), float(alpha_bar))
    coefs = vpsde_coefficients(vpsde_times(t_star, dt), beta_min, beta_max).to(x.device, x.dtype)  # once, no syncs
    if trace is not None:
        trace.append(y.detach())
    for k, coef in enumerate(coefs):
        z = noise(1 + k, y)
        if grad_checkpoint and torch.is_grad_enabled():
            y = checkpointed(grad_checkpoint, vpsde_step, model, y, z, coef)
        else:
            y = vpsde_step(model, y, z, coef)
        if trace is not None:
            trace.append(y.detach())
    return (y + 1) / 2


def vpsde_purifier(model, t_star=0.1, beta_min=0.1, beta_max=20.0, dt=1e-3):
    """DiffPure's defence around a score_sde NCSN++ (models/ncsnpp.load_score_sde); the defaults are its
    CIFAR-10 settings (--t 100, the Linf runs; its L2 runs use t* = 0.125)."""
    settings = dict(t_star=t_star, beta_min=beta_min, beta_max=beta_max, dt=dt)
    times = vpsde_times(t_star, dt)
    steps = len(times) - 1
    t = vpsde_t_index(t_star)
    info = {"family": "vpsde", "t_star": t, "beta_min": beta_min, "beta_max": beta_max, "dt": dt, "steps": steps,
            "alpha_bar_star": float(linear_alpha_bar(T, beta_min / T, beta_max / T)[t - 1]),
            "sde_times": [float(times[0]), float(times[-1])], "model_calls": steps, "noise_draws": 1 + steps}
    return Purifier("vpsde", vpsde_purify, model, info, **settings)


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


FAMILY_FLAGS = {"ddpm": "ddpm", "ddim": "ddpm", "vpsde": "vpsde", "edm": "edm"}  # --defense -> its model flag


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
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()},
                    "ema": {"decay": 0.9999, "num_updates": step,
                            "shadow_params": [p.detach().cpu() for p in model.parameters()]},
                    "step": step}, os.path.join(folder, "checkpoint.pth"))
    else:
        torch.save(sd, os.path.join(folder, "edm-ema.pth"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)


# ---------------------------------------------------------------- the flags purify.py and attack.py share

DEFENSES = ["ddpm", "ddim", "vpsde", "edm"]
# flags that belong to some families only: --flag -> the defences it applies to
FAMILY_ONLY = {"nfe": ("ddpm", "ddim", "vpsde"), "t_star": ("ddpm", "ddim", "vpsde"), "eta": ("ddim",),
               "sigma_max": ("edm",), "edm_steps": ("edm",), "s_churn": ("edm",)}


def add_purification_args(p, defenses=DEFENSES):
    """The flags purify.py and attack.py share: defence and models, classifier, data, schedule, speed."""
    p.add_argument("--defense", choices=defenses, default="ddpm",
                   help="DP_DDPM, DP_DDIM, DiffPure's VP-SDE (DDPM++) or ADDT's EDM purification")
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
    p.add_argument("--t-star", type=float, default=None, help="diffusion depth as a fraction of T (default 0.1)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0 = deterministic reverse)")
    p.add_argument("--sigma-max", type=float, default=None, help="edm: t* in sigma units (default 0.5)")
    p.add_argument("--edm-steps", type=int, default=None, help="edm: reverse steps (default 50; 2 x steps - 1 calls)")
    p.add_argument("--s-churn", type=float, default=None, help="edm: S_churn (default 6 = EDM-SDE; 0 = EDM-ODE)")
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
    for flag, families in FAMILY_ONLY.items():
        if getattr(args, flag) is not None and args.defense not in families:
            raise UserError(f"--{flag.replace('_', '-')} applies to --defense {' / '.join(families)}, "
                            f"not {args.defense}")
    if args.defense in DEFAULT_NFE and args.nfe is None:  # ddpm, ddim (vpsde: dt = 1e-3 unless --nfe; none: -)
        args.nfe = DEFAULT_NFE[args.defense]
    args.t_star = 0.1 if args.t_star is None and args.defense in FAMILY_ONLY["t_star"] else args.t_star
    args.eta = 0.0 if args.eta is None and args.defense == "ddim" else args.eta
    if args.defense == "edm":
        args.sigma_max = 0.5 if args.sigma_max is None else args.sigma_max
        args.edm_steps = 50 if args.edm_steps is None else args.edm_steps
        args.s_churn = 6.0 if args.s_churn is None else args.s_churn
    check_positive(args, "n", "nfe", "edm_steps", "sigma_max")
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
        return vpsde_purifier(model, t_star=args.t_star, dt=dt)
    return edm_purifier(model, sigma_max=args.sigma_max, num_steps=args.edm_steps, S_churn=args.s_churn)


def load_inputs(args, device, defended=True):
    """Diffusion model (None when undefended), classifier and the first N images, checked against each
    other; the files named on the command line are read before the data set (which may be downloaded)."""
    if not args.classifier:
        raise UserError("no classifier given: pass --classifier CKPT (train one with train_classifier.py; "
                        "`python attack.py --preset smoke` checks an install without one)")
    model = load_diffusion_model(args.defense, getattr(args, FAMILY_FLAGS[args.defense])) if defended else None
    classifier = load_classifier(args.classifier, arch=args.arch, norm=args.classifier_norm)
    data = load_split(args.data, args.split)
    if args.n > len(data.labels):
        raise UserError(f"--n {args.n} but {args.data} {args.split} holds {len(data.labels)} images")
    if classifier.net.num_classes != len(data.classes):
        raise UserError(f"classifier checkpoint {args.classifier} has {classifier.net.num_classes} classes, the data "
                        f"have {len(data.classes)}: pass the classifier trained on this data set")
    if model is not None:
        model = prepare(args, model, device)
    return model, prepare(args, classifier, device), data.images[:args.n], data.labels[:args.n]


def prepare(args, model, device):
    """A network on the device with the run's --channels-last and --compile (--compile-mode)."""
    return prepare_model(model, device, args.channels_last, args.compile and args.compile_mode)
