"""Adversarial Denoising Diffusion Training (ADDT): fine-tune a diffusion model on CGPO perturbations
mapped to Gaussian noise by RBGM (paper section 5, Algorithm 1; SPEC.md "ADDT fine-tuning").

    python train_addt.py --ddpm DIR --classifier CKPT --data cifar10           # the paper's setting (DDPM)
    torchrun --nproc_per_node=8 train_addt.py --ddpm DIR --classifier CKPT     # 8 x 32 = 256 per step
    python train_addt.py --model vpsde --vpsde checkpoint_8.pth --classifier CKPT   # DiffPure's VP-SDE (DDPM++)
    python train_addt.py --model edm --edm edm-cifar10-32x32-uncond-vp.pkl --classifier CKPT
    python train_addt.py --perturb none ...          # "clean" fine-tuning ablation (lambda = 0)
    python train_addt.py --perturb linf ...          # ADDT_linf ablation (PGD-5 in image space)
    python train_addt.py --guidance mse ...          # CGPO maximises MSE(eps_theta, eps) instead of CE
    python train_addt.py --init scratch --perturb none --data cifar10   # plain DDPM from random init
    python train_addt.py --out runs/addt --resume    # continue (the same flags); --extend with a larger --epochs
    python train_addt.py --fast ...                  # bf16 on CUDA, channels_last, compiled network and classifier

One training step for every family (`--model`), each written in its own parameterisation of
x_t = a_t x0 + s_t eps' with eps' = sqrt(1 - lambda_t^2) eps + lambda_t delta (paper eq. 6) and
lambda_t = clip(0.03 a_t / s_t, 0, 0.3) (eq. 7):
  ddpm   t ~ U{0..999}, a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), eps-prediction, eps-MSE loss
  vpsde  t ~ U[1e-3, 1] (continuous VP, beta 0.1..20), a = exp(-t^2 (20 - 0.1) / 4 - 0.1 t / 2),
         s = sqrt(1 - a^2), the network sees t * 999, eps-MSE loss (official train_VPSDE_DDPMPP_ADDT)
  edm    sigma = exp(1.2 n - 1.2), n ~ N(0, 1), a = 1, s = sigma, D(x; sigma) predicts x0, EDM's weighted
         x0 loss (sigma^2 + 0.25) / (0.5 sigma)^2 |D - x0|^2 (official train_edm_ADDT)
CGPO's one-step estimate is x0_hat = (x_t - s eps_theta) / a (D itself for EDM).

Writes OUT/ckpt.pt (model, EMA, optimiser, step, flags; written atomically every --ckpt-every steps and
at the end; --resume continues exactly), OUT/ema/ (the EMA weights, replaced atomically: a diffusers
DDPMPipeline folder for ddpm, a score_sde checkpoint for vpsde, an ADDT/EDM state dict for edm; what
purify.py and attack.py load), OUT/log.jsonl and OUT/args.json. All randomness of a step is keyed by
(seed, rank, step), so a resumed run equals an uninterrupted one.
"""
import argparse
import copy
import json
import math
import os
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from addt_common import (Dist, Progress, UserError, append_jsonl, atomic_save, autocast, check_device,
                         check_finite_weights, check_out_dir, check_positive, check_range, eager_module,
                         load_checkpoint, load_kernel, lock_out, os_reason, prepare_model, read_json, read_jsonl,
                         refuse_overwrite, require, resolve_precision, run_main, sample_seed, unlock_out, write_json,
                         write_text)
from addt_data import epoch_indices, load_split, random_crop_flip, to_float
from addt_diffusion import (T, add_speed_args, check_models_fit, check_speed_args, linear_alpha_bar,
                            load_diffusion_model, speed_settings)
from models import load_classifier

rbgm = load_kernel("rbgm").rbgm
LAMBDA_DEFAULTS = {"rbgm": (0.03, 0.0, 0.3), "linf": (1.0, 0.0, 10.0), "none": (0.0, 0.0, 0.0)}
DROPOUT_DEFAULTS = {"ddpm": 0.1, "vpsde": 0.1, "edm": 0.13}  # SPEC.md; EDM's train.py --dropout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["ddpm", "vpsde", "edm"], default="ddpm", help="the diffusion family")
    p.add_argument("--ddpm", help="pretrained diffusers-layout UNet (google/ddpm-cifar10-32), --model ddpm")
    p.add_argument("--vpsde", help="score_sde checkpoint (DiffPure's checkpoint_8.pth), --model vpsde")
    p.add_argument("--edm", help="EDM pickle (edm-cifar10-32x32-uncond-vp.pkl) or ADDT .pth, --model edm")
    p.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained")
    p.add_argument("--classifier", help="classifier checkpoint for CGPO guidance")
    p.add_argument("--arch", default=None, help="classifier arch for a bare state dict")
    p.add_argument("--classifier-norm", default=None,
                   help="none | cifar10 | cifar100 | M1,M2,M3/S1,S2,S3 (default: the checkpoint family's)")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--perturb", choices=list(LAMBDA_DEFAULTS), default=None,
                   help="rbgm (ADDT, default), linf (ADDT_linf), none (clean; default with --init scratch)")
    p.add_argument("--guidance", choices=["ce", "mse"], default=None, help="what CGPO maximises (default ce)")
    p.add_argument("--cgpo-iters", type=int, default=None, help="CGPO iterations (default 5)")
    p.add_argument("--lambda-unit", type=float, default=None, help="default 0.03 (rbgm), 1 (linf)")
    p.add_argument("--lambda-min", type=float, default=None, help="default 0")
    p.add_argument("--lambda-max", type=float, default=None, help="default 0.3 (rbgm), 10 (linf)")
    p.add_argument("--linf-eps", type=float, default=None, help="--perturb linf: budget on [0, 1] images "
                   "(default 8/255)")
    p.add_argument("--linf-step", type=float, default=None, help="--perturb linf: step (default 4/255)")
    p.add_argument("--t-max", type=float, default=1.0,
                   help="train on t <= t_max * T only (a deviation from the paper's uniform t, for the quick "
                        "preset: purification only visits t <= t*); ddpm and vpsde")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests, trials)")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="per-process micro-batch (default global/world)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.95, 0.999))
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=None, help="every Dropout of the model (default 0.1; edm 0.13)")
    p.add_argument("--ema-inv-gamma", type=float, default=1.0)
    p.add_argument("--ema-power", type=float, default=0.75)
    p.add_argument("--ema-max-decay", type=float, default=0.9999)
    p.add_argument("--seed", type=int, default=0)
    add_speed_args(p)  # --fast: bf16 autocast on CUDA, channels_last, torch.compile of the network and classifier
    p.add_argument("--device", default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--out", default="runs/addt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--extend", action="store_true", help="with --resume: run to a larger --epochs / --max-steps")
    return check_args(p.parse_args(argv))


def check_args(args):
    """Defaults that depend on other flags, and every flag checked before anything is loaded."""
    check_out_dir(args.out)
    check_device(args.device)
    check_speed_args(args)
    args.perturb = args.perturb or ("none" if args.init == "scratch" else "rbgm")
    check_flags_apply(args)
    args.guidance = args.guidance or "ce"
    args.cgpo_iters = 5 if args.cgpo_iters is None else args.cgpo_iters
    args.linf_eps = 8 / 255 if args.linf_eps is None else args.linf_eps
    args.linf_step = 4 / 255 if args.linf_step is None else args.linf_step
    unit, lo, hi = LAMBDA_DEFAULTS[args.perturb]
    args.lambda_unit = unit if args.lambda_unit is None else args.lambda_unit
    args.lambda_min = lo if args.lambda_min is None else args.lambda_min
    args.lambda_max = hi if args.lambda_max is None else args.lambda_max
    args.dropout = DROPOUT_DEFAULTS[args.model] if args.dropout is None else args.dropout
    check_positive(args, "epochs", "max_steps", "global_batch", "batch_size", "cgpo_iters", "lr", "grad_clip",
                   "log_every", "ckpt_every", "ema_inv_gamma", "ema_power")
    check_range(args, "weight_decay", 0, math.inf, hi_open=True)
    check_range(args, "dropout", 0, 1, hi_open=True)
    check_range(args, "ema_max_decay", 0, 1, hi_open=True)
    check_range(args, "t_max", 0, 1, lo_open=True)
    for b in args.betas:
        require(math.isfinite(b) and 0 <= b < 1, f"--betas must lie in [0, 1), not {args.betas}")
    for name in ("lambda_unit", "lambda_min", "lambda_max", "linf_eps", "linf_step"):
        check_range(args, name, 0, math.inf, hi_open=True)
    if args.perturb == "rbgm":  # eq. 6 needs sqrt(1 - lambda^2): lambda beyond 1 is no mixture
        check_range(args, "lambda_min", 0, 1)
        check_range(args, "lambda_max", 0, 1)
    require(args.lambda_min <= args.lambda_max, f"--lambda-min {args.lambda_min} > --lambda-max {args.lambda_max}")
    require(args.seed >= 0, f"--seed must be non-negative, not {args.seed}")
    require(not args.extend or args.resume, "--extend continues a run: pass it with --resume")
    require(args.model != "edm" or args.t_max == 1.0, "--t-max applies to --model ddpm and vpsde")
    if args.perturb != "none" and args.guidance == "ce" and not args.classifier:
        raise UserError("CGPO with --guidance ce needs --classifier CKPT (train one with train_classifier.py); "
                        "use --perturb none for clean fine-tuning")
    if args.init == "pretrained" and not getattr(args, args.model):
        raise UserError(f"pass --{args.model} PATH with the pretrained model (for ddpm e.g. google/ddpm-cifar10-32 "
                        "from https://huggingface.co/google/ddpm-cifar10-32) or --init scratch")
    return args


def check_flags_apply(args):
    """Flags that would be ignored are refused (a run must do what its flags say)."""
    def given(*names):
        return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    for flag in ("ddpm", "vpsde", "edm"):
        require(getattr(args, flag) is None or flag == args.model, f"--{flag} is the model of --model {flag}, not "
                                                                  f"{args.model}")
    if bad := given("linf_eps", "linf_step") if args.perturb != "linf" else []:
        raise UserError(f"{', '.join(bad)}: for --perturb linf only, not {args.perturb}")
    cgpo = given("guidance", "cgpo_iters", "lambda_unit", "lambda_min", "lambda_max")
    if bad := cgpo if args.perturb == "none" else []:
        raise UserError(f"{', '.join(bad)}: for CGPO's perturbation only, which --perturb none does not make")
    if bad := given("arch", "classifier_norm") if not args.classifier else []:
        raise UserError(f"{', '.join(bad)}: for --classifier only, which is not given")


# ---------------------------------------------------------------- the families (paper eqs. 2, 4, 6, 7)

class DDPM:
    """Discrete DDPM: t ~ U{0..T-1} (or up to t_max T), epsilon prediction, eps-MSE loss."""
    name = "ddpm"

    def __init__(self, device, t_max=1.0):
        self.alpha_bar = linear_alpha_bar().to(device)
        self.t_hi = max(1, round(t_max * T))

    def sample_t(self, n, g):
        return torch.randint(0, self.t_hi, (n,), generator=g, device=self.alpha_bar.device)

    def scales(self, t):
        ab = self.alpha_bar[t]
        return ab.sqrt(), (1 - ab).sqrt()

    def predict(self, model, x_t, t, a, s):
        """(x0_hat, eps_hat): eq. 4, not clipped."""
        eps = model(x_t, t).float()
        return x0_estimate(x_t, eps, a, s), eps

    def loss(self, x0_hat, eps_hat, x0, eps_mix, t):
        return F.mse_loss(eps_hat, eps_mix)


class VPSDE(DDPM):
    """Continuous VP-SDE (beta 0.1..20, as score_sde/DiffPure): t ~ U[1e-3, 1] (or up to t_max), the
    network's label t * 999."""
    name = "vpsde"
    beta_min, beta_max, t_min = 0.1, 20.0, 1e-3

    def __init__(self, device, t_max=1.0):
        self.device, self.t_max = device, t_max

    def sample_t(self, n, g):
        return torch.rand(n, generator=g, device=self.device) * (self.t_max - self.t_min) + self.t_min

    def scales(self, t):
        log_mean = -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return log_mean.exp(), (1 - (2 * log_mean).exp()).sqrt()

    def predict(self, model, x_t, t, a, s):
        eps = model(x_t, t * (T - 1)).float()
        return x0_estimate(x_t, eps, a, s), eps


class EDM(DDPM):
    """EDM (Karras et al.): sigma = exp(P_std n + P_mean), x_t = x0 + sigma eps', D(x_t; sigma) predicts x0,
    loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDMLoss)."""
    name = "edm"
    P_mean, P_std, sigma_data = -1.2, 1.2, 0.5

    def __init__(self, device, t_max=1.0):
        self.device = device

    def sample_t(self, n, g):
        return (torch.randn(n, generator=g, device=self.device) * self.P_std + self.P_mean).exp()

    def scales(self, sigma):
        return torch.ones_like(sigma), sigma

    def predict(self, model, x_t, sigma, a, s):
        D = model(x_t, sigma).float()
        return D, (x_t - D) / sigma.view(-1, 1, 1, 1)

    def loss(self, x0_hat, eps_hat, x0, eps_mix, sigma):
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return (weight.view(-1, 1, 1, 1) * (x0_hat - x0) ** 2).mean()


FAMILIES = {"ddpm": DDPM, "vpsde": VPSDE, "edm": EDM}


def lambda_t(a, s, unit=0.03, lo=0.0, hi=0.3):
    """eq. 7: lambda_t = clip(unit * gamma_t, lo, hi), gamma_t = a_t / s_t (sqrt(alpha_bar) / sqrt(1 - alpha_bar)
    for DDPM)."""
    return (unit * a / s).clamp(lo, hi)


def mix_noise(eps, delta, lam, perturb="rbgm"):
    """eq. 6: eps' = sqrt(1 - lambda^2) eps + lambda delta (delta Gaussian-like from RBGM); for the
    linf ablation delta lives in image space and is added on top: eps' = eps + lambda delta."""
    lam = lam.view(-1, 1, 1, 1)
    if perturb == "linf":
        return eps + lam * delta
    return (1 - lam ** 2).sqrt() * eps + lam * delta


def noisy(x0, eps_mix, a, s):
    """eq. 2 with the mixed noise: x_t = a x0 + s eps' (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar))."""
    return a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps_mix


def x0_estimate(x_t, eps_pred, a, s):
    """eq. 4: the one-step estimate x0_hat = (x_t - s eps_theta) / a (not clipped)."""
    return (x_t - s.view(-1, 1, 1, 1) * eps_pred) / a.view(-1, 1, 1, 1)


def guidance_loss(x0_hat, eps_hat, eps, y, classifier, guidance):
    """What CGPO maximises: the classifier's CE on x0_hat (ce), or MSE(eps_theta(x_t, t), eps) with eps the
    fresh Gaussian part of the noise (mse: the official train_ADDT_l2_loss_for_ablation.py)."""
    if guidance == "mse":
        return F.mse_loss(eps_hat.float(), eps)
    return F.cross_entropy(classifier((x0_hat.float() + 1) / 2).float(), y)


def cgpo(family, model, classifier, x0, y, t, lam, args, g_rng, amp):
    """Classifier-Guided Perturbation Optimization (Algorithm 1, lines 4-10).
    rbgm: delta ~ N(0, I); g accumulates d loss / d delta over the iterations, delta = RBGM(g).
    linf: delta = 0, then PGD steps of size linf_step inside the linf_eps ball (image space).
    Gradients are taken with respect to delta only: no parameter gradients are computed.
    Returns the final delta, the guidance loss of the first iteration and g, the gradients summed over
    the iterations (for rbgm delta = RBGM(g): appendix D looks at g's ranks)."""
    a, s = family.scales(t)
    if args.perturb == "rbgm":
        delta = torch.randn(x0.shape, generator=g_rng, device=x0.device)
    else:
        delta = torch.zeros_like(x0)
    g = torch.zeros_like(x0)
    first_loss = None
    for _ in range(args.cgpo_iters):
        d = delta.detach().requires_grad_(True)
        eps = torch.randn(x0.shape, generator=g_rng, device=x0.device)
        x_t = noisy(x0, mix_noise(eps, d, lam, args.perturb), a, s)
        with amp():
            x0_hat, eps_hat = family.predict(model, x_t, t, a, s)
            loss = guidance_loss(x0_hat, eps_hat, eps, y, classifier, args.guidance)
        grad, = torch.autograd.grad(loss, [d])
        first_loss = loss.detach() if first_loss is None else first_loss
        g = g + grad
        if args.perturb == "rbgm":
            delta = rbgm(g, generator=g_rng)
        else:  # model units are 2x image units; x0 + delta stays a valid image
            eps_, step_ = 2 * args.linf_eps, 2 * args.linf_step
            delta = (delta + step_ * grad.sign()).clamp(-eps_, eps_)
            delta = (x0 + delta).clamp(-1, 1) - x0
    return delta.detach(), first_loss, g


class EMA:
    """EMA of the weights with warmup (diffusers EMAModel, use_ema_warmup=True):
    decay = min(1 - (1 + step / inv_gamma) ** -power, max_decay), 0 on the first step."""

    def __init__(self, model, inv_gamma=1.0, power=0.75, max_decay=0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.inv_gamma, self.power, self.max_decay = inv_gamma, power, max_decay
        self.step = 0

    def decay(self):
        s = self.step - 1
        return 0.0 if s <= 0 else min(1 - (1 + s / self.inv_gamma) ** -self.power, self.max_decay)

    @torch.no_grad()
    def update(self, model):
        self.step += 1
        w = 1 - self.decay()
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), w)

    def state_dict(self):
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.step = state["step"]


STATS = ("loss", "cgpo_before", "cgpo_after", "clf_acc")


def train_step(model, net, family, classifier, ema, opt, batches, args, g_rng, amp):
    """One optimisation step over the micro-batches (x0 in [-1, 1], y): CGPO, then the family's loss
    against the mixed noise (for DDPM the epsilon-MSE, equal to the paper's weighted x0 loss, eq. 8).
    model: what is called (DDP-wrapped or not); net: the bare network (EMA, no_sync)."""
    stats = {k: torch.zeros((), device=batches[0][0].device) for k in STATS}
    opt.zero_grad(set_to_none=True)
    for j, (x0, y) in enumerate(batches):
        t = family.sample_t(len(x0), g_rng)
        a, s = family.scales(t)
        lam = lambda_t(a, s, args.lambda_unit, args.lambda_min, args.lambda_max)
        if args.perturb == "none":
            delta, before = torch.zeros_like(x0), None
        else:
            delta, before, _ = cgpo(family, net, classifier, x0, y, t, lam, args, g_rng, amp)
        eps = torch.randn(x0.shape, generator=g_rng, device=x0.device)
        eps_mix = mix_noise(eps, delta, lam, args.perturb)
        x_t = noisy(x0, eps_mix, a, s)
        sync = j == len(batches) - 1 or not isinstance(eager_module(model), DDP)
        with model.no_sync() if not sync else torch.enable_grad():
            with amp():
                x0_hat, eps_hat = family.predict(model, x_t, t, a, s)
                loss = family.loss(x0_hat, eps_hat, x0, eps_mix, t)
            (loss / len(batches)).backward()  # outside autocast, as torch.autocast asks
        stats["loss"] += loss.detach() / len(batches)
        with torch.no_grad(), amp():  # how well the final delta does against the model being trained
            logits = None if classifier is None else classifier((x0_hat.detach().float() + 1) / 2).float()
            if before is not None:  # the same objective as `before`, so the two are comparable
                after = F.mse_loss(eps_hat.float(), eps) if args.guidance == "mse" else F.cross_entropy(logits, y)
                stats["cgpo_before"] += before / len(batches)
                stats["cgpo_after"] += after / len(batches)
            if logits is not None:
                stats["clf_acc"] += (logits.argmax(1) == y).float().mean() / len(batches)
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    stats = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one host sync per step
    if all(math.isfinite(v) for v in stats.values()):  # else main() stops
        opt.step()
        ema.update(net)
    return stats


def step_modules(args, net, classifier, device, ddp=False):
    """What train_step calls, with the speed flags (--fast): (model for the update, DDP-wrapped under
    torchrun; the network CGPO calls; the classifier; amp, a fresh autocast context per call; the resolved
    precision). With --compile both calls of the network (CGPO's input gradients and the update) go through
    one torch.compile'd module sharing net's weights; EMA and checkpoints keep using the bare `net`.
    bench.py times exactly this."""
    precision = resolve_precision(args.precision, device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)  # in place: the optimiser and EMA see the same tensors
    mode = args.compile and args.compile_mode
    model = DDP(net, device_ids=[device] if device.type == "cuda" else None) if ddp else net
    step_net = prepare_model(net, device, compile=mode, train=True)
    model = step_net if not ddp else prepare_model(model, device, compile=mode, train=True)
    if classifier is not None:
        classifier = prepare_model(classifier, device, args.channels_last, mode)
    return model, step_net, classifier, lambda: autocast(device, precision), precision


# ---------------------------------------------------------------- models, export, resume

def set_dropout(model, p):
    """p on every Dropout module, the attention output's included (as the official set_dropout)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_model(args):
    """The model to fine-tune: pretrained (the family's loader) or random weights (--init scratch, the
    architecture of the given checkpoint's config if any)."""
    path = getattr(args, args.model)
    if args.init == "pretrained":
        return load_diffusion_model(args.model, path)
    if args.model != "ddpm":
        model = load_diffusion_model(args.model, path) if path else None
        from addt_diffusion import new_diffusion_model
        return new_diffusion_model(args.model, None if model is None else model.config)
    from models.unet import DDPM_CIFAR10_CONFIG, UNet
    config = dict(DDPM_CIFAR10_CONFIG)
    if path:
        sub = os.path.join(path, "unet")
        cfg_path = os.path.join(sub if os.path.isdir(sub) else path, "config.json")
        require(os.path.isfile(cfg_path), f"--init scratch --ddpm {path}: no config.json there to take the "
                                          "architecture from (drop --ddpm for the DDPM CIFAR-10 UNet)")
        config = read_json(cfg_path, "UNet config")
    try:
        return UNet(config)
    except ValueError as e:
        raise UserError(f"--init scratch: {e}") from None


def export_ema(args, ema, out):
    """The EMA weights (what purification uses) in the family's own loadable format, written to
    OUT/ema.tmp/ and then put in place of OUT/ema/ (never half a folder)."""
    from addt_diffusion import save_diffusion_model
    final, tmp, old = (os.path.join(out, n) for n in ("ema", "ema.tmp", "ema.old.tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_diffusion_model(args.model, ema.model, tmp, step=ema.step)
    except OSError as e:  # a full disk: the previous export stays, the next checkpoint step tries again
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "; the previous export is intact" if os.path.exists(final) else ""
        raise UserError(f"could not write {final}: {os_reason(e)}{kept}") from None
    for root, _, files in os.walk(tmp):  # normal modes: safetensors creates its files 0600
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# flags that change the weights: --resume must keep them (--epochs / --max-steps only with --extend)
RESULT_FLAGS = ("model", "ddpm", "vpsde", "edm", "init", "classifier", "arch", "classifier_norm", "data", "perturb",
                "guidance", "cgpo_iters", "lambda_unit", "lambda_min", "lambda_max", "linf_eps", "linf_step", "t_max",
                "global_batch", "batch_size", "lr", "betas", "weight_decay", "grad_clip", "dropout", "ema_inv_gamma",
                "ema_power", "ema_max_decay", "seed", "precision", "world", "epochs", "max_steps")


def check_same_run(before, args, world):
    now = {**vars(args), "world": world}
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON turns tuples into lists)
    longer = ("epochs", "max_steps")
    changed = [k for k in RESULT_FLAGS if k in before and norm(before[k]) != norm(now[k])
               and not (args.extend and k in longer)]
    diffs = ", ".join(f"--{k.replace('_', '-')} {before[k]} -> {now[k]}" for k in changed)
    require(not changed, f"--resume with other settings than the checkpoint was made with ({diffs}); use the same "
            "flags (--extend allows a larger --epochs / --max-steps) or another --out")


def read_checkpoint(path, args, world):
    ckpt = load_checkpoint(path, "ADDT checkpoint")
    require(isinstance(ckpt, dict) and {"model", "ema", "optimizer", "step", "args"} <= set(ckpt),
            f"{path} is not a train_addt.py checkpoint (a classifier checkpoint?); pass the --out of an ADDT run")
    check_same_run(ckpt["args"], args, world)
    check_finite_weights({k: ckpt[k] for k in ("model", "ema", "optimizer")}, path)
    return ckpt


def trim_log(path, step):
    """Keep the log rows up to `step`: a run killed between checkpoints logged steps that resume repeats;
    a row cut by the kill is dropped."""
    rows = [r for r in read_jsonl(path, repair=True) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # atomic: a full disk keeps the old log


# ---------------------------------------------------------------- set-up and loop

def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    d.agree(lambda: (refuse_overwrite(ckpt_path, args.resume), lock_out(args.out)))  # before any loading
    per_gpu = args.batch_size or max(args.global_batch // d.world, 1)  # at least 1: no division by 0 below
    accum = args.global_batch // (per_gpu * d.world)
    if accum < 1 or accum * per_gpu * d.world != args.global_batch:
        raise UserError(f"--global-batch {args.global_batch} is not a multiple of --batch-size {per_gpu} x "
                        f"{d.world} processes")
    ckpt = read_checkpoint(ckpt_path, args, d.world) if args.resume else None

    torch.manual_seed(args.seed)  # --init scratch: the same random weights for the same --seed
    net = build_model(args).to(d.device)
    set_dropout(net, args.dropout)
    family = FAMILIES[args.model](d.device, args.t_max)
    data = load_split(args.data, "train")
    classifier = None
    if args.classifier:
        classifier = load_classifier(args.classifier, arch=args.arch, norm=args.classifier_norm)
    check_models_fit(data, f"--data {args.data}", net, getattr(args, args.model) or f"of --init {args.init}",
                     classifier, args.classifier)
    images, labels = data.images.to(d.device), data.labels.to(d.device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    ema = EMA(net, args.ema_inv_gamma, args.ema_power, args.ema_max_decay)
    step, window = 0, []
    if ckpt is not None:
        if ckpt.get("config") != net.config:
            raise UserError(f"{ckpt_path} holds a model of another config than --{args.model} / --init gives")
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, window = ckpt["step"], ckpt.get("log_window", [])
    model, step_net, classifier, amp, precision = step_modules(args, net, classifier, d.device, d.ddp)

    steps_per_epoch = len(labels) // args.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{args.data} holds {len(labels)} training images, fewer than --global-batch")
    total = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)
    log_path = os.path.join(args.out, "log.jsonl")
    if d.master:
        write_json(os.path.join(args.out, "args.json"), {**vars(args), "world": d.world,
                                                         "classifier_norm_info": getattr(classifier, "norm_info", None),
                                                         "speed": speed_settings(args, precision)})
        trim_log(log_path, step)
        print(f"ADDT ({args.model}): perturb {args.perturb}, guidance {args.guidance}, {total} steps of "
              f"{args.global_batch} ({d.world} x {per_gpu} x {accum}), {precision}, from step {step}", flush=True)
        print(f"speed: {speed_settings(args, precision)}", flush=True)

    def save(path):
        check_finite_weights(net.state_dict(), "the model being trained")
        atomic_save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "step": step, "config": net.config, "args": {**vars(args), "world": d.world},
                     "log_window": window}, path)

    progress = Progress(total - step, "addt", "steps", every=30, enabled=d.master)
    t_window = time.time()
    net.train()
    order = {}  # this epoch's image order, made once per epoch
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in order:
            order = {epoch: epoch_indices(len(labels), epoch, args.seed, d.rank, d.world).to(d.device)}
        idx = order[epoch][k * per_gpu * accum:(k + 1) * per_gpu * accum]
        torch.manual_seed(sample_seed(args.seed, d.rank, step, 0))  # dropout
        g_rng = torch.Generator(device=d.device).manual_seed(sample_seed(args.seed, d.rank, step, 1))
        batches = [(2 * random_crop_flip(to_float(images[i]), pad=0, generator=g_rng) - 1, labels[i])
                   for i in idx.split(per_gpu)]
        stats = train_step(model, step_net, family, classifier, ema, opt, batches, args, g_rng, amp)
        step += 1
        if not all(math.isfinite(v) for v in stats.values()):
            if d.master:
                atomic_save({"model": net.state_dict(), "ema": ema.state_dict(), "step": step, "config": net.config,
                             "args": vars(args)}, os.path.join(args.out, f"nonfinite-step{step}.pt"))
            raise UserError(f"non-finite loss or gradient at step {step} ({stats}); the weights before the "
                            f"update are in {args.out}/nonfinite-step{step}.pt")
        window.append(stats)
        progress.update(1)
        if d.master and (step % args.log_every == 0 or step == total):
            row = {key: sum(s[key] for s in window) / len(window) for key in window[0]}
            row.update(step=step, epoch=step / steps_per_epoch, ema_decay=ema.decay(),
                       images_per_s=len(window) * args.global_batch / (time.time() - t_window))
            print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()),
                  flush=True)
            append_jsonl(log_path, [row])
            window, t_window = [], time.time()
        if d.master and (step % args.ckpt_every == 0 or step == total):
            save(ckpt_path)
            export_ema(args, ema, args.out)
    if d.master:  # also when resuming a run whose final export was interrupted
        export_ema(args, ema, args.out)
    d.barrier()
    unlock_out(args.out)
    if d.master:
        print(f"done: {step} steps; EMA weights in {os.path.join(args.out, 'ema')} "
              f"(use: python purify.py --defense {args.model} --{args.model} {os.path.join(args.out, 'ema')} ...)")
    return net, ema


if __name__ == "__main__":
    run_main(main)
