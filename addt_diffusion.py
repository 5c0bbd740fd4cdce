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
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from addt_common import UserError, keyed_normal, prepare_model
from addt_data import load_split
from kernels.ddpm_step import reverse_step
from models import load_classifier

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
            x_t = checkpoint(denoise_step, unet, x_t, t, z, coefs[i], use_reentrant=False)
        else:
            x_t = denoise_step(unet, x_t, t, z, coefs[i])
        if trace is not None:
            trace.append(x_t.detach())
    return (x_t + 1) / 2


class Purifier:
    """purify(x, noise) of one family with its model and settings: what purify.py evaluates and attacks
    differentiate. `grad_checkpoint` is switched on by attacks (per network call)."""

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


def load_unet(path, **overrides):
    """The diffusers-layout UNet at `path`, with a clear error when it is missing or mismatched."""
    from models.unet import UNet
    hint = ("pass --ddpm DIR holding config.json + diffusion_pytorch_model.safetensors (for example the "
            "google/ddpm-cifar10-32 repository from https://huggingface.co/google/ddpm-cifar10-32, or the "
            "export of train_addt.py, which also trains one from scratch with --init scratch)")
    if not path:
        raise UserError(f"no diffusion model given: {hint}")
    try:
        return UNet.from_pretrained(path, **overrides)
    except FileNotFoundError as e:
        raise UserError(f"{e}; {hint}") from e
    except ValueError as e:
        raise UserError(f"diffusion model {path} does not match its config: {e}") from e


def add_purification_args(p):
    """The flags purify.py and attack.py share: models, data, schedule, speed settings."""
    p.add_argument("--ddpm", help="diffusers-layout UNet directory (e.g. google/ddpm-cifar10-32)")
    p.add_argument("--classifier", help="classifier checkpoint (train_classifier.py or RobustBench layout)")
    p.add_argument("--arch", default=None, help="classifier arch for a RobustBench state dict (default wrn-28-10)")
    p.add_argument("--data", default="cifar10", help="data set name or path (see addt_data.py)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=1024,
                   help="first N images of the split (write --num-images under torchrun, which takes --n as its own)")
    p.add_argument("--nfe", type=int, default=None, help="paper's NFE (default 100 for ddpm, 10 for ddim)")
    p.add_argument("--t-star", type=float, default=0.1, help="diffusion depth as a fraction of T")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic reverse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")


def load_inputs(args, device, defended=True):
    """UNet (None when undefended), classifier and the first N images, checked against each other
    (cheap checks first)."""
    if not args.classifier:
        raise UserError("no classifier given: pass --classifier CKPT (train one with train_classifier.py; "
                        "`python attack.py --preset smoke` checks an install without one)")
    unet = load_unet(args.ddpm) if defended else None
    data = load_split(args.data, args.split)
    if args.n > len(data.labels):
        raise UserError(f"--n {args.n} but {args.data} {args.split} holds {len(data.labels)} images")
    classifier = load_classifier(args.classifier, arch=args.arch, num_classes=len(data.classes))
    if unet is not None:
        unet = prepare_model(unet, device, args.channels_last, args.compile)
    classifier = prepare_model(classifier, device, args.channels_last, args.compile)
    return unet, classifier, data.images[:args.n], data.labels[:args.n]
