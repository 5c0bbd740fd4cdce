"""Attacks on a defended classifier classifier(purify(x, noise)), as importable functions
(SPEC.md "Attack and evaluation"). Works on any purifier and classifier module:

    from addt_attacks import Defense, pgd_eot
    defense = Defense(my_purify, my_classifier, setting="dw-both")   # my_purify(x, noise) -> [0, 1]
    x_adv, records = pgd_eot(defense, x, y, eps=8 / 255, step_size=2 / 255, steps=20, eot=10)

A purifier is any callable `purify(x, noise)`: x in [0, 1] (B, C, H, W); its randomness comes from
`noise(k, like)`, which returns draw k (standard normal, shaped like `like`); draw 0 is the forward
noise (see addt_diffusion). The Defense decides what stands behind `noise` for every pipeline
(image, stage, step, draw) according to the attacker's knowledge of the randomness:

  white-box  every purification draws fresh noise
  dw-fwd     draw 0 (the forward noise) is fixed per image and shared with the evaluation
  dw-both    every draw is fixed per image and shared: a deterministic defence
  dw-semi    the randomness is one of `semi_n` fixed noise sets per image; the attack cycles through
             the sets (EoT over the set), the evaluation picks one of them

Every draw is keyed by (seed, image index, stage, step, draw), so results do not depend on batch
size, process count or where a run was resumed. Pipelines run in chunks of exactly `chunk` (the last
padded), so each image's numbers come from a batch of the same size whatever the batching.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from addt_common import sample_seed
from addt_diffusion import KeyedNoise

SETTINGS = ["white-box", "dw-fwd", "dw-both", "dw-semi"]
CLEAN, ATTACK, EVAL, FIXED, SEMI, SEMI_PICK = range(6)  # key stages of the noise streams
STAGE_NAMES = {CLEAN: "clean evaluation", ATTACK: "attack", EVAL: "final evaluation"}


class NonFiniteError(ValueError):
    """Logits (or purified images) that are NaN or inf: no accuracy may be computed from them."""


def ce_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


class Defense:
    """classifier(purifier(x, noise)) for pipelines (image index, stage, step, draw), with the noise of
    each pipeline keyed by the setting. purifier None attacks the bare classifier.

    precision: 'fp32' (default, as the official code) or 'bf16' (autocast); grad_checkpoint: recompute
    each network call of the purifier in the backward pass (purifiers with a `grad_checkpoint`
    attribute, as ours; memory then grows by one image tensor per step)."""

    def __init__(self, purifier, classifier, setting="white-box", seed=0, semi_n=128, chunk=64,
                 precision="fp32", grad_checkpoint=True):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}: one of {SETTINGS}")
        self.purifier, self.classifier, self.setting, self.seed = purifier, classifier, setting, seed
        self.semi_n, self.chunk, self.precision, self.grad_checkpoint = semi_n, chunk, precision, grad_checkpoint

    # ------------------------------------------------------------ which noise each pipeline gets

    def keys(self, i, stage, step, draw, eot=1):
        """(fresh key, fixed key, number of fixed draws) of one purification of image i."""
        s = self.seed
        fresh = sample_seed(s, i, stage, step, draw)
        if self.setting == "dw-both":
            return fresh, sample_seed(s, i, FIXED), math.inf
        if self.setting == "dw-semi":  # the attack cycles through the N sets; evaluation picks one
            n = self.semi_n
            j = (step * eot + draw) % n if stage == ATTACK else sample_seed(s, i, SEMI_PICK, step, draw) % n
            return fresh, sample_seed(s, i, SEMI, j), math.inf
        if self.setting == "dw-fwd":
            return fresh, sample_seed(s, i, FIXED), 1
        return fresh, fresh, 0

    def noise(self, pipes, stage, device, eot=1):
        keys = [self.keys(i, stage, step, d, eot) for i, step, d in pipes]
        return KeyedNoise(torch.tensor([k[0] for k in keys], device=device),
                          torch.tensor([k[1] for k in keys], device=device), keys[0][2])

    # ------------------------------------------------------------ running pipelines

    def autocast(self, device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def logits(self, x, pipes, stage, grad=False, eot=1):
        """Logits (float32) of the pipelines; x: (P, C, H, W); pipes: P tuples (image, step, draw)."""
        with self.autocast(x.device):
            if self.purifier is None:
                return self.classifier(x).float()
            if hasattr(self.purifier, "grad_checkpoint"):
                self.purifier.grad_checkpoint = grad and self.grad_checkpoint
            x_pur = self.purifier(x, self.noise(pipes, stage, x.device, eot))
            return self.classifier(x_pur.float()).float()

    def run(self, x, y, pipes, stage, grad=False, loss_fn=ce_loss, eot=1):
        """(logits, per-pipeline loss, d loss / d x or None) of the pipelines, in chunks of exactly
        `chunk` (the last padded with copies of its first pipeline)."""
        c = self.chunk
        logits, losses, grads = [], [], []
        for lo in range(0, len(pipes), c):
            hi = min(lo + c, len(pipes))
            pad = c - (hi - lo)
            x_c = torch.cat([x[lo:hi], x[lo:lo + 1].expand(pad, *x.shape[1:])]).detach()
            p_c = list(pipes[lo:hi]) + [pipes[lo]] * pad
            with torch.set_grad_enabled(grad):
                x_c.requires_grad_(grad)
                out = self.logits(x_c, p_c, stage, grad, eot)[:hi - lo]
                loss = loss_fn(out, y[lo:hi])
                if grad:  # the sum keeps each pipeline's gradient its own
                    g, = torch.autograd.grad(loss.sum(), x_c)
                    grads.append(g[:hi - lo])
            logits.append(out.detach())
            losses.append(loss.detach())
        return torch.cat(logits), torch.cat(losses), (torch.cat(grads) if grad else None)

    def eot_gradient(self, x, y, idx, step, eot, loss_fn=ce_loss):
        """Sum over `eot` draws of d loss / d x per image, with the per-draw losses (eot, B) and
        logits (eot, B, classes). The draws run as one batch (draws x images), summed in draw order."""
        n = len(idx)
        pipes = [(i, step, d) for d in range(eot) for i in idx]
        logits, loss, grads = self.run(x.repeat(eot, 1, 1, 1), y.repeat(eot), pipes, ATTACK, True, loss_fn, eot)
        check_finite(logits, idx * eot, f"PGD step {step + 1}")
        g = grads[:n]
        for d in range(1, eot):
            g = g + grads[d * n:(d + 1) * n]
        return g, loss.view(eot, n), logits.view(eot, n, -1)

    def predict(self, x, idx, stage, draws=1, step=0):
        """Logits (draws, B, classes) of `draws` purifications of each image (draw 0 first)."""
        n = len(idx)
        y = torch.zeros(len(idx) * draws, dtype=torch.long, device=x.device)
        pipes = [(i, step, d) for d in range(draws) for i in idx]
        logits, _, _ = self.run(x.repeat(draws, 1, 1, 1), y, pipes, stage)
        check_finite(logits, idx * draws, STAGE_NAMES.get(stage, f"stage {stage}"))
        return logits.view(draws, n, -1)


def check_finite(logits, idx, stage):
    """Refuse NaN/inf logits (argmax of NaN is class 0: it would count as correct for class 0)."""
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bad.any():
        images = sorted({idx[k] for k in bad.nonzero().flatten().tolist()})
        raise NonFiniteError(f"non-finite logits at the {stage} for image(s) {images[:10]}"
                             f"{' ...' if len(images) > 10 else ''}: NaN or inf in the weights, the inputs "
                             "or the settings (e.g. --eps, --eta); no accuracy is reported")


# ---------------------------------------------------------------- PGD with EoT

def project(x, x_adv, eps, norm):
    """Project x_adv onto the eps ball around x (l_inf or l_2) and into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        d_norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        delta = delta * (eps / d_norm.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


def pgd_step(x, x_adv, g, eps, step_size, norm):
    """One PGD step: sign step (l_inf) or normalised step (l_2), then the projection."""
    if norm == "linf":
        return project(x, x_adv + step_size * g.sign(), eps, norm)
    g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return project(x, x_adv + step_size * g / g_norm, eps, norm)


def evaluate(defense, x, y, idx, stage, draws=1):
    """(prediction of draw 0, correct fraction over the draws, CE loss of draw 0) per image."""
    logits = defense.predict(x, idx, stage, draws)
    preds = logits.argmax(-1)
    return preds[0], (preds == y).float().mean(0), F.cross_entropy(logits[0], y, reduction="none")


def pgd_eot(defense, x, y, idx=None, eps=8 / 255, step_size=2 / 255, steps=20, eot=10, norm="linf",
            eval_draws=1, on_step=None):
    """PGD from delta = 0 (no random start) with the gradient summed over `eot` draws per step
    (SPEC.md), then one fresh evaluation of the final iterate. idx: the images' indices in the data
    set (they key the noise; default 0..B-1). Returns (x_adv, per-image records)."""
    idx = list(range(len(x))) if idx is None else list(idx)
    clean_pred, clean_frac, _ = evaluate(defense, x, y, idx, CLEAN, eval_draws)
    x_adv = x.clone()
    for step in range(steps):
        g, _, _ = defense.eot_gradient(x_adv, y, idx, step, eot)
        x_adv = pgd_step(x, x_adv, g, eps, step_size, norm)
        if on_step:
            on_step()
    pred, frac, loss = evaluate(defense, x_adv, y, idx, EVAL, eval_draws)
    delta = (x_adv - x).flatten(1)
    records = [{"index": i, "label": int(y[k]), "clean_pred": int(clean_pred[k]), "pred": int(pred[k]),
                "clean_correct_frac": float(clean_frac[k]), "robust_correct_frac": float(frac[k]),
                "loss": float(loss[k]), "linf": float(delta[k].abs().max()), "l2": float(delta[k].norm())}
               for k, i in enumerate(idx)]
    return x_adv, records
