"""Adversarial Denoising Diffusion Training (ADDT): fine-tune a DDPM UNet on CGPO perturbations
mapped to Gaussian noise by RBGM (paper section 5, Algorithm 1; SPEC.md "ADDT fine-tuning").

    python train_addt.py --ddpm DIR --classifier CKPT --data cifar10           # the paper's setting
    torchrun --nproc_per_node=8 train_addt.py --ddpm DIR --classifier CKPT     # 8 x 32 = 256 per step
    python train_addt.py --perturb none ...          # "clean" fine-tuning ablation (lambda = 0)
    python train_addt.py --perturb linf ...          # ADDT_linf ablation (PGD-5 in image space)
    python train_addt.py --guidance mse ...          # CGPO maximises the x0 error instead of CE
    python train_addt.py --init scratch --perturb none --data cifar10   # plain DDPM from random init

Writes OUT/ckpt.pt (model, EMA, optimiser, step; written atomically every --ckpt-every steps and
at the end; --resume continues exactly), OUT/ema/ (the EMA weights in the diffusers layout that
purify.py and attack.py load), OUT/log.jsonl and OUT/args.json. All randomness of a step is keyed
by (seed, rank, step), so a resumed run equals an uninterrupted one.
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from addt_common import (Dist, Progress, UserError, atomic_save, autocast, load_checkpoint, prepare_model,
                    refuse_overwrite, resolve_precision, run_main, sample_seed, write_json)
from addt_data import epoch_indices, load_split, random_crop_flip, to_float
from addt_diffusion import T, linear_alpha_bar, load_unet
from kernels.rbgm import rbgm
from models import load_classifier
from models.unet import DDPM_CIFAR10_CONFIG, UNet

LAMBDA_DEFAULTS = {"rbgm": (0.03, 0.0, 0.3), "linf": (1.0, 0.0, 10.0), "none": (0.0, 0.0, 0.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddpm", help="pretrained diffusers-layout UNet (google/ddpm-cifar10-32)")
    p.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained")
    p.add_argument("--classifier", help="classifier checkpoint for CGPO guidance")
    p.add_argument("--arch", default=None, help="classifier arch for a RobustBench state dict")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--perturb", choices=list(LAMBDA_DEFAULTS), default=None,
                   help="rbgm (ADDT, default), linf (ADDT_linf), none (clean; default with --init scratch)")
    p.add_argument("--guidance", choices=["ce", "mse"], default="ce")
    p.add_argument("--cgpo-iters", type=int, default=5)
    p.add_argument("--lambda-unit", type=float, default=None, help="default 0.03 (rbgm), 1 (linf)")
    p.add_argument("--lambda-min", type=float, default=None, help="default 0")
    p.add_argument("--lambda-max", type=float, default=None, help="default 0.3 (rbgm), 10 (linf)")
    p.add_argument("--linf-eps", type=float, default=8 / 255, help="ADDT_linf budget on [0, 1] images")
    p.add_argument("--linf-step", type=float, default=4 / 255)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests, trials)")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="per-process micro-batch (default global/world)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.95, 0.999))
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--ema-inv-gamma", type=float, default=1.0)
    p.add_argument("--ema-power", type=float, default=0.75)
    p.add_argument("--ema-max-decay", type=float, default=0.9999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--out", default="runs/addt")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    args.perturb = args.perturb or ("none" if args.init == "scratch" else "rbgm")
    unit, lo, hi = LAMBDA_DEFAULTS[args.perturb]
    args.lambda_unit = unit if args.lambda_unit is None else args.lambda_unit
    args.lambda_min = lo if args.lambda_min is None else args.lambda_min
    args.lambda_max = hi if args.lambda_max is None else args.lambda_max
    if args.perturb != "none" and args.guidance == "ce" and not args.classifier:
        raise UserError("CGPO with --guidance ce needs --classifier CKPT (train one with train_classifier.py); "
                        "use --perturb none for clean fine-tuning")
    if args.init == "pretrained" and not args.ddpm:
        raise UserError("pass --ddpm DIR (e.g. google/ddpm-cifar10-32 from "
                        "https://huggingface.co/google/ddpm-cifar10-32) or --init scratch")
    return args


# ---------------------------------------------------------------- ADDT (paper eqs. 6-9, Algorithm 1)

def lambda_t(alpha_bar, unit=0.03, lo=0.0, hi=0.3):
    """eq. 7: lambda_t = clip(unit * gamma_t, lo, hi), gamma_t = sqrt(alpha_bar) / sqrt(1 - alpha_bar)."""
    return (unit * alpha_bar.sqrt() / (1 - alpha_bar).sqrt()).clamp(lo, hi)


def mix_noise(eps, delta, lam, perturb="rbgm"):
    """eq. 6: eps' = sqrt(1 - lambda^2) eps + lambda delta (delta Gaussian-like from RBGM); for the
    linf ablation delta lives in image space and is added on top: eps' = eps + lambda delta."""
    lam = lam.view(-1, 1, 1, 1)
    if perturb == "linf":
        return eps + lam * delta
    return (1 - lam ** 2).sqrt() * eps + lam * delta


def noisy(x0, eps_mix, alpha_bar):
    """eq. 2 with the mixed noise: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps'."""
    ab = alpha_bar.view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps_mix


def x0_estimate(x_t, eps_pred, alpha_bar):
    """eq. 4: the one-step estimate x0_hat (not clipped)."""
    ab = alpha_bar.view(-1, 1, 1, 1)
    return (x_t - (1 - ab).sqrt() * eps_pred) / ab.sqrt()


def guidance_loss(x0_hat, x0, y, classifier, guidance):
    """What CGPO maximises: the classifier's CE on x0_hat (ce) or the reconstruction error (mse)."""
    if guidance == "mse":
        return F.mse_loss(x0_hat.float(), x0)
    return F.cross_entropy(classifier((x0_hat.float() + 1) / 2).float(), y)


def cgpo(unet, classifier, x0, y, t, alpha_bar, lam, args, g_rng, amp):
    """Classifier-Guided Perturbation Optimization (Algorithm 1, lines 4-10).
    rbgm: delta ~ N(0, I); g accumulates d loss / d delta over the iterations, delta = RBGM(g).
    linf: delta = 0, then PGD steps of size linf_step inside the linf_eps ball (image space).
    Gradients are taken with respect to delta only: no parameter gradients are computed.
    Returns the final delta and the guidance loss of the first iteration."""
    if args.perturb == "rbgm":
        delta = torch.randn(x0.shape, generator=g_rng, device=x0.device)
    else:
        delta = torch.zeros_like(x0)
    g = torch.zeros_like(x0)
    first_loss = None
    for _ in range(args.cgpo_iters):
        d = delta.detach().requires_grad_(True)
        eps = torch.randn(x0.shape, generator=g_rng, device=x0.device)
        x_t = noisy(x0, mix_noise(eps, d, lam, args.perturb), alpha_bar)
        with amp():
            x0_hat = x0_estimate(x_t, unet(x_t, t).float(), alpha_bar)
            loss = guidance_loss(x0_hat, x0, y, classifier, args.guidance)
        grad, = torch.autograd.grad(loss, [d])
        first_loss = loss.detach() if first_loss is None else first_loss
        if args.perturb == "rbgm":
            g = g + grad
            delta = rbgm(g, generator=g_rng)
        else:  # model units are 2x image units; x0 + delta stays a valid image
            eps_, step_ = 2 * args.linf_eps, 2 * args.linf_step
            delta = (delta + step_ * grad.sign()).clamp(-eps_, eps_)
            delta = (x0 + delta).clamp(-1, 1) - x0
    return delta.detach(), first_loss


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


def train_step(model, unet, classifier, ema, opt, batches, alpha_bar, args, g_rng, amp):
    """One optimisation step over the micro-batches (x0 in [-1, 1], y): CGPO, then the epsilon-MSE
    loss against the mixed noise (equal to the paper's weighted x0 loss, eq. 8)."""
    stats = {k: torch.zeros((), device=batches[0][0].device) for k in ("loss", "cgpo_before", "cgpo_after", "clf_acc")}
    opt.zero_grad(set_to_none=True)
    for j, (x0, y) in enumerate(batches):
        t = torch.randint(0, T, (len(x0),), generator=g_rng, device=x0.device)
        ab = alpha_bar[t]
        lam = lambda_t(ab, args.lambda_unit, args.lambda_min, args.lambda_max)
        if args.perturb == "none":
            delta, before = torch.zeros_like(x0), None
        else:
            delta, before = cgpo(unet, classifier, x0, y, t, ab, lam, args, g_rng, amp)
        eps = torch.randn(x0.shape, generator=g_rng, device=x0.device)
        eps_mix = mix_noise(eps, delta, lam, args.perturb)
        x_t = noisy(x0, eps_mix, ab)
        sync = j == len(batches) - 1 or not isinstance(model, DDP)
        with model.no_sync() if not sync else torch.enable_grad():
            with amp():
                eps_pred = model(x_t, t).float()
                loss = F.mse_loss(eps_pred, eps_mix)
            (loss / len(batches)).backward()  # outside autocast, as torch.autocast asks
        stats["loss"] += loss.detach() / len(batches)
        with torch.no_grad(), amp():  # how well the final delta does against the model being trained
            x0_hat = x0_estimate(x_t, eps_pred.detach(), ab)
            logits = None if classifier is None else classifier((x0_hat.float() + 1) / 2).float()
            if before is not None:  # the same objective as `before`, so the two are comparable
                after = F.mse_loss(x0_hat.float(), x0) if args.guidance == "mse" else F.cross_entropy(logits, y)
                stats["cgpo_before"] += before / len(batches)
                stats["cgpo_after"] += after / len(batches)
            if logits is not None:
                stats["clf_acc"] += (logits.argmax(1) == y).float().mean() / len(batches)
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    stats = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one host sync per step
    if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):  # else main() stops
        opt.step()
        ema.update(unet)
    return stats


# ---------------------------------------------------------------- set-up and loop

def build_unet(args):
    if args.init == "scratch":  # random weights; the architecture of --ddpm's config.json if given
        config = dict(DDPM_CIFAR10_CONFIG)
        if args.ddpm:
            sub = os.path.join(args.ddpm, "unet")
            path = os.path.join(sub if os.path.isdir(sub) else args.ddpm, "config.json")
            if not os.path.isfile(path):
                raise UserError(f"--init scratch --ddpm {args.ddpm}: no config.json there to take the architecture "
                                "from (drop --ddpm for the DDPM CIFAR-10 UNet)")
            with open(path) as f:
                config = json.load(f)
        return UNet({**config, "dropout": args.dropout})
    return load_unet(args.ddpm, dropout=args.dropout)


def trim_log(path, step):
    """Drop the log rows after `step`: a run killed between checkpoints logged steps that resume repeats."""
    if os.path.isfile(path):
        with open(path) as f:
            rows = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)


def export_ema(ema, out):
    """The EMA weights in the diffusers layout (what purification uses)."""
    ema.model.save_pretrained(os.path.join(out, "ema"))


def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    refuse_overwrite(ckpt_path, args.resume)  # before any loading
    per_gpu = args.batch_size or max(args.global_batch // d.world, 1)  # at least 1: no division by 0 below
    accum = args.global_batch // (per_gpu * d.world)
    if accum < 1 or accum * per_gpu * d.world != args.global_batch:
        raise UserError(f"--global-batch {args.global_batch} is not a multiple of --batch-size {per_gpu} x "
                        f"{d.world} processes")
    precision = resolve_precision(args.precision, d.device)
    amp = lambda: autocast(d.device, precision)  # a fresh context each use

    torch.manual_seed(args.seed)  # --init scratch: the same random weights for the same --seed
    unet = build_unet(args).to(d.device)
    data = load_split(args.data, "train")
    images, labels = data.images.to(d.device), data.labels.to(d.device)
    classifier = None
    if args.classifier:
        classifier = prepare_model(load_classifier(args.classifier, arch=args.arch, num_classes=len(data.classes)),
                                   d.device)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    ema = EMA(unet, args.ema_inv_gamma, args.ema_power, args.ema_max_decay)
    step = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, "ADDT checkpoint")
        if ckpt["config"] != unet.config:
            raise UserError(f"{ckpt_path} holds a UNet of another config than --ddpm / --init gives")
        unet.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    model = DDP(unet, device_ids=[d.device] if d.device.type == "cuda" else None) if d.ddp else unet
    alpha_bar = linear_alpha_bar().to(d.device)

    steps_per_epoch = len(labels) // args.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{args.data} holds {len(labels)} training images, fewer than --global-batch")
    total = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)
    if d.master:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "args.json"), vars(args))
        trim_log(os.path.join(args.out, "log.jsonl"), step)
        print(f"ADDT: perturb {args.perturb}, guidance {args.guidance}, {total} steps of {args.global_batch} "
              f"({d.world} x {per_gpu} x {accum}), {precision}, from step {step}", flush=True)

    def save(path):
        atomic_save({"model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "step": step, "config": unet.config, "args": vars(args)}, path)

    progress = Progress(total - step, "addt", "steps", every=30, enabled=d.master)
    window, t_window = [], time.time()
    unet.train()
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
        stats = train_step(model, unet, classifier, ema, opt, batches, alpha_bar, args, g_rng, amp)
        step += 1
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
            if d.master:
                save(os.path.join(args.out, f"nonfinite-step{step}.pt"))
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
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            window, t_window = [], time.time()
        if d.master and (step % args.ckpt_every == 0 or step == total):
            save(ckpt_path)
            export_ema(ema, args.out)
    d.barrier()
    if d.master:
        print(f"done: {step} steps; EMA weights in {os.path.join(args.out, 'ema')} "
              f"(use: python purify.py --ddpm {os.path.join(args.out, 'ema')} ...)")
    return unet, ema


if __name__ == "__main__":
    run_main(main)
