"""Attacks on a defended classifier classifier(purify(x, noise)) and the protocols that score them, as
importable functions (SPEC.md "Attack and evaluation"). Works on any purifier and classifier module.

Example (tests/test_attacks_api.py runs this snippet, so it stays true):

    import torch
    from addt_attacks import Defense, pgd_eot, summarize_records
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    def purify(x, noise):                          # x in [0, 1]; noise(k, like) returns draw k
        return (x + 0.1 * noise(0, x)).clamp(0, 1)
    x = torch.rand(16, 3, 8, 8)
    y = classifier(x).argmax(1)                    # labels the bare classifier gets right
    for setting, eot in [("white-box", 4), ("dw-both", 1)]:
        x_adv, records = pgd_eot(Defense(purify, classifier, setting), x, y, steps=10, eot=eot)
        s = summarize_records(records)
        print(setting, s["robust_accuracy"], "clean", s["clean_accuracy"])

A purifier is any callable `purify(x, noise)`: x in [0, 1] (B, C, H, W); its randomness comes from
`noise(k, like)`, which returns draw k (standard normal, shaped like `like`); draw 0 is the forward
noise (see addt_diffusion). The Defense decides what stands behind `noise` for every pipeline
(image, stage, step, draw) according to the attacker's knowledge of the randomness:

  white-box  every purification draws fresh noise
  dw-fwd     draw 0 (the forward noise) is fixed per image and shared with the evaluation
  dw-both    every draw is fixed per image and shared: a deterministic defence
  dw-semi    the randomness is one of `semi_n` fixed noise sets per image; the attack cycles through
             the sets (EoT over the set), the evaluation picks one of them

Every draw (and every random start) is keyed by (seed, image index, stage, step, draw), so results do
not depend on batch size, process count or where a run was resumed. Pipelines run in chunks of exactly
`chunk` (the last padded), so each image's numbers come from a batch of the same size whatever the
batching.

Attacks, each returning (x_adv, per-image records: plain dicts, JSON-friendly):
  pgd_eot          PGD with EoT, the paper's attack (zero start, CE, gradients summed over draws)
  apgd             APGD-CE / APGD-DLR (Croce & Hein 2020), l_inf and l_2, restarts, EoT
  autoattack_rand  AutoAttack's rand version (APGD-CE then APGD-DLR, EoT 20), upstream or fixed

Protocols (how a stochastic defence's accuracy is scored; named in every record):
  single      one fresh purification per image (the paper's number)
  mean-K      the fraction of K fresh purifications classified correctly (a fraction per image)
  worst-N     correct only if all N purifications are
  majority-N  correct if more than half of N purifications are
Records give, for the clean and the adversarial image, the fraction of draws classified correctly
(`clean_correct_frac`, `robust_correct_frac`) and the protocol's decision (`clean`, `robust`);
`summarize_records` turns them into accuracies with Wilson intervals.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from addt_common import keyed_normal, sample_seed
from addt_diffusion import KeyedNoise

SETTINGS = ["white-box", "dw-fwd", "dw-both", "dw-semi"]
# key stages of the noise streams and of the random starts
CLEAN, ATTACK, EVAL, FIXED, SEMI, SEMI_PICK, START, CHECK = range(8)
STAGE_NAMES = {CLEAN: "clean evaluation", ATTACK: "attack", EVAL: "evaluation", CHECK: "APGD's clean check"}
BUDGETS = {"linf": 8 / 255, "l2": 0.5}  # default eps on [0, 1] images
CHECKPOINT_SAFETY = 2.0  # "auto" checkpoints when 2 x the graph of one chunk exceeds the free memory
AUTO_CHUNK_MAX = {"cuda": 4096, "cpu": 64}  # chunk 'auto': at most this (the CPU gains nothing from more)
PROBE_PIPELINES = 2  # pipelines that memory_estimate runs forward (eagerly) to measure the graph


class NonFiniteError(ValueError):
    """Logits (or purified images) that are NaN or inf: no accuracy may be computed from them."""


def ce_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits, y):
    """Croce & Hein's difference of logits ratio, -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12),
    with pi sorting the logits in decreasing order (needs 3 classes or more)."""
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    z_sorted, order = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = torch.where(order[:, -1] == y, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


LOSSES = {"ce": ce_loss, "dlr": dlr_loss}


# ---------------------------------------------------------------- protocols

def parse_protocol(text):
    """'single' -> ('single', 1); 'mean-K', 'worst-N', 'majority-N' -> (name, K or N)."""
    if text == "single":
        return "single", 1
    name, _, n = str(text).partition("-")
    if name not in ("mean", "worst", "majority") or not (n.isascii() and n.isdigit()) or int(n) < 1:
        raise ValueError(f"unknown protocol {text!r}: use single, mean-K, worst-N or majority-N with K, N >= 1 "
                         "(e.g. mean-20, worst-10, majority-5)")
    return name, int(n)


def protocol_score(correct, protocol):
    """Per-image score of correctness (draws, B) under the protocol, from its first N draws: 0/1, or the
    fraction correct for mean-K."""
    name, n = parse_protocol(protocol)
    if len(correct) < n:
        raise ValueError(f"protocol {protocol} needs {n} draws, got {len(correct)}")
    c = correct[:n].float()
    if name == "single":
        return c[0]
    if name == "mean":
        return c.mean(0)
    if name == "worst":
        return c.min(0).values
    return (c.sum(0) > n / 2).float()


# ---------------------------------------------------------------- the defended model

def available_memory(device):
    """Bytes free for new tensors on `device` (CUDA: free plus cached by PyTorch; CPU: MemAvailable),
    or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fit_chunk(per_pipeline, free, cap):
    """The largest chunk whose gradient (per_pipeline bytes each) fits CHECKPOINT_SAFETY times into `free`
    bytes: at most `cap`, at least 1, a multiple of 64 from 128 on (sizes the GPU runs well)."""
    n = cap if free is None else int(free / (CHECKPOINT_SAFETY * max(per_pipeline, 1)))
    n = max(1, min(cap, n))
    return n - n % 64 if n >= 128 else n


class Defense:
    """classifier(purifier(x, noise)) for pipelines (image index, stage, step, draw), with the noise of
    each pipeline keyed by the setting. purifier None attacks the bare classifier.

    precision: 'fp32' (default, as the official code) or 'bf16' (autocast).
    grad_checkpoint: True / False / 'auto' / 'selective' (also 'on' / 'off'): recompute each network call
    of the purifier in the backward pass (purifiers with a `grad_checkpoint` attribute, as ours), trading
    about 2x time for memory that grows by one image tensor per step only; 'selective' keeps the outputs
    of convolutions, matmuls and attention and recomputes only the cheap ops between them. 'auto' decides
    once, at the first gradient, from memory_estimate: it checkpoints when CHECKPOINT_SAFETY times the
    graph of one chunk exceeds the available memory. The decision is in `checkpoint_info`.

    chunk: pipelines per forward/backward, or 'auto': sized at the first gradient from the available
    memory and memory_estimate (at most AUTO_CHUNK_MAX of the device type); then fixed (`chunk_info`).
    Numbers depend on the chunk (never on how many pipelines are asked for at once), so a run records it."""

    def __init__(self, purifier, classifier, setting="white-box", seed=0, semi_n=128, chunk=64,
                 precision="fp32", grad_checkpoint="auto"):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}: one of {SETTINGS}")
        grad_checkpoint = {"on": True, "off": False}.get(grad_checkpoint, grad_checkpoint)
        if grad_checkpoint not in (True, False, "auto", "selective"):
            raise ValueError(f"grad_checkpoint must be True, False, 'auto' or 'selective', not {grad_checkpoint!r}")
        if chunk != "auto" and not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"chunk must be a positive int or 'auto', not {chunk!r}")
        self.purifier, self.classifier, self.setting, self.seed = purifier, classifier, setting, seed
        self.semi_n, self.chunk, self.precision, self.grad_checkpoint = semi_n, chunk, precision, grad_checkpoint
        self.checkpoint_info = None  # filled at the first gradient
        self.chunk_info = None if chunk == "auto" else {"request": chunk, "chunk": chunk}

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

    # ------------------------------------------------------------ memory: checkpointing and the chunk

    @property
    def checkpointing(self):
        """Whether gradients recompute the purifier's network calls: False, True or 'selective' (None
        before 'auto' has decided)."""
        return None if self.checkpoint_info is None else self.checkpoint_info["on"]

    def memory_estimate(self, x, pipes, stage, eot=1):
        """Bytes per pipeline that the gradient of classifier(purifier(x)) holds, measured by running the
        pipelines forward once on the EAGER networks (a torch.compile'd module keeps its saved tensors
        inside its compiled graph, out of autograd's sight: the estimate, and every decision taken from
        it, is that of the eager module, whatever the compilation; compiled graphs save less, not more).
        A saved-tensors hook counts and drops what autograd would keep (frozen weights and other
        constants are not copies and are not counted):
          off        everything, without checkpointing
          on         per-call checkpointing: what is saved outside the network calls, the inputs each
                     checkpointed call keeps (x_t and its step noise), and one call's graph, rebuilt
                     while the backward pass goes through it
          selective  'on' plus the outputs of the convolutions, matmuls and attention of every call
        with `calls`, the network calls counted."""
        from addt_common import eager_module
        from addt_diffusion import SAVED_OPS
        from torch.utils._python_dispatch import TorchDispatchMode
        p, purifier = len(pipes), self.purifier
        net = eager_module(purifier.model) if hasattr(purifier, "model") else None
        count = {"saved": 0, "calls": 0, "inputs": 0, "costly": 0, "inside": False}

        def pack(t):
            if t.requires_grad or not t.is_floating_point():
                count["saved"] += t.numel() * t.element_size()

        def enter(module, args):
            count["calls"] += 1
            count["inputs"] += args[0].numel() * args[0].element_size() if args and torch.is_tensor(args[0]) else 0
            count["inside"] = True

        def leave(module, args, out):
            count["inside"] = False

        class Costly(TorchDispatchMode):  # the outputs selective checkpointing would keep
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if count["inside"] and func in SAVED_OPS:
                    count["costly"] += sum(o.numel() * o.element_size() for o in
                                           (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o))
                return out

        def forward(mode):
            count["saved"] = 0
            if switchable:
                purifier.grad_checkpoint = mode
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
                with self.autocast(x.device), (Costly() if not mode and net is not None else nullcontext()):
                    x_pur = x.detach().requires_grad_(True)
                    if purifier is not None:
                        x_pur = purifier(x_pur, self.noise(pipes, stage, x.device, eot))
                    eager_module(self.classifier)(x_pur.float())
            return count["saved"]

        switchable = hasattr(purifier, "grad_checkpoint")
        compiled, switch = getattr(purifier, "model", None), getattr(purifier, "grad_checkpoint", None)
        hooks = [net.register_forward_pre_hook(enter), net.register_forward_hook(leave)] if net is not None else []
        try:
            if net is not None:
                purifier.model = net
            off = forward(False) / p
            if net is None or not count["calls"]:  # no switch, or no network call seen: nothing to checkpoint
                return {"off": off, "on": off, "selective": off, "calls": count["calls"], "probe_pipelines": p}
            calls, inputs, costly = count["calls"], count["inputs"], count["costly"]
            count["inside"] = False
            outside = forward(True) / p
        finally:
            for h in hooks:
                h.remove()
            if net is not None:
                purifier.model = compiled
            if switchable:
                purifier.grad_checkpoint = switch
        on = outside + 2 * inputs / p + off / calls
        return {"off": off, "on": on, "selective": on + costly / p, "calls": calls, "probe_pipelines": p}

    def probe(self, x, pipes):
        """The first PROBE_PIPELINES pipelines of a chunk: what memory_estimate runs."""
        k = min(PROBE_PIPELINES, len(pipes))
        return x[:k], pipes[:k]

    def decide_chunk(self, x, pipes, stage, eot=1):
        """'auto': the largest chunk that fits (fit_chunk), sized for the checkpointing asked for ('auto'
        sizes it for per-call checkpointing, then decides as usual for that chunk)."""
        est = self.memory_estimate(*self.probe(x, pipes), stage, eot)
        free, cap = available_memory(x.device), AUTO_CHUNK_MAX.get(x.device.type, 64)
        policy = {True: "on", False: "off", "auto": "on", "selective": "selective"}[self.grad_checkpoint]
        self.chunk = fit_chunk(est[policy], free, cap)
        self.chunk_info = {"request": "auto", "chunk": self.chunk, "sized_for_checkpoint": policy,
                           "bytes_per_pipeline": est, "available_bytes": free, "safety": CHECKPOINT_SAFETY,
                           "cap": cap}
        return est

    def decide_checkpoint(self, x, pipes, stage, eot=1, est=None):
        """The checkpointing of every gradient: as asked, or for 'auto' from the estimate for a chunk of
        self.chunk pipelines."""
        if not hasattr(self.purifier, "grad_checkpoint"):
            self.checkpoint_info = {"request": self.grad_checkpoint, "on": False,
                                    "reason": "the purifier has no grad_checkpoint switch"}
        elif self.grad_checkpoint != "auto":
            self.checkpoint_info = {"request": self.grad_checkpoint, "on": self.grad_checkpoint}
        else:
            est = est or self.memory_estimate(*self.probe(x, pipes), stage, eot)
            need, free = self.chunk * est["off"], available_memory(x.device)
            self.checkpoint_info = {"request": "auto", "on": free is None or CHECKPOINT_SAFETY * need > free,
                                    "saved_bytes_per_chunk": need, "available_bytes": free,
                                    "safety": CHECKPOINT_SAFETY, "bytes_per_pipeline": est}

    def prepare(self, x, pipes, stage, eot=1):
        """Size the chunk ('auto') and decide the checkpointing ('auto') before the first gradient, from the
        pipelines (x, pipes) of a gradient (only their first PROBE_PIPELINES run, forward, eagerly)."""
        est = self.decide_chunk(x, pipes, stage, eot) if self.chunk == "auto" else None
        if self.checkpoint_info is None:
            self.decide_checkpoint(x, pipes, stage, eot, est)

    # ------------------------------------------------------------ running pipelines

    def autocast(self, device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def logits(self, x, pipes, stage, grad=False, eot=1):
        """Logits (float32) of the pipelines; x: (P, C, H, W); pipes: P tuples (image, step, draw)."""
        with self.autocast(x.device):
            if self.purifier is None:
                return self.classifier(x).float()
            if hasattr(self.purifier, "grad_checkpoint"):
                self.purifier.grad_checkpoint = self.checkpointing if grad and self.checkpointing else False
            x_pur = self.purifier(x, self.noise(pipes, stage, x.device, eot))
            return self.classifier(x_pur.float()).float()

    def run(self, x, y, pipes, stage, grad=False, loss_fn=ce_loss, eot=1):
        """(logits, per-pipeline loss, d loss / d x or None) of the pipelines, in chunks of exactly
        `chunk` (the last padded with copies of its first pipeline)."""
        if self.chunk == "auto" or grad and self.checkpoint_info is None:
            self.prepare(x, pipes, stage, eot)
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
        check_finite(logits, idx * eot, f"logits at the attack step {step}")
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
        check_finite(logits, idx * draws, f"logits at the {STAGE_NAMES.get(stage, f'stage {stage}')}")
        return logits.view(draws, n, -1)

    def classifier_predict(self, x, idx):
        """The bare classifier's prediction (no purification), in the same chunks: the official
        `all_cls_acc`."""
        if self.chunk == "auto":  # the run's one chunk, sized on this defence's pipelines
            self.prepare(x, [(i, 0, 0) for i in idx], CLEAN)
        bare = Defense(None, self.classifier, chunk=self.chunk, precision=self.precision)
        return bare.predict(x, idx, CLEAN)[0].argmax(-1)


def check_finite(values, idx, what):
    """Refuse NaN/inf logits (argmax of NaN is class 0: it would count as correct for class 0) or
    purified images; values: (P, ...) with idx[p] the image of row p; what: e.g. 'logits at the attack'."""
    bad = ~torch.isfinite(values.flatten(1)).all(dim=1)
    if bad.any():
        images = sorted({idx[k] for k in bad.nonzero().flatten().tolist()})
        raise NonFiniteError(f"non-finite {what} for image(s) {images[:10]}"
                             f"{' ...' if len(images) > 10 else ''}: NaN or inf in the weights, the inputs "
                             "or the settings (e.g. --eps, --eta); no accuracy is reported")


# ---------------------------------------------------------------- steps, projections, random starts

def per_sample(v, x):
    """A (B,) vector shaped to broadcast against x (B, ...)."""
    return v.view(-1, *[1] * (x.dim() - 1))


def project(x, x_adv, eps, norm):
    """Project x_adv onto the eps ball around x (l_inf or l_2) and into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        d_norm = per_sample(delta.flatten(1).norm(dim=1), x)
        delta = delta * (eps / d_norm.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


def pgd_step(x, x_adv, g, eps, step_size, norm):
    """One PGD step: sign step (l_inf) or normalised step (l_2), then the projection."""
    if norm == "linf":
        return project(x, x_adv + step_size * g.sign(), eps, norm)
    g_norm = per_sample(g.flatten(1).norm(dim=1).clamp_min(1e-12), x)
    return project(x, x_adv + step_size * g / g_norm, eps, norm)


def keyed_uniform(keys, draw, shape, device):
    """Uniform(0, 1) draws keyed like keyed_normal (through the normal CDF)."""
    return 0.5 * (1 + torch.erf(keyed_normal(keys, draw, shape, device) / math.sqrt(2)))


def pgd_start(x, idx, eps, norm, seed, step=0):
    """PGD's random start, keyed by (seed, image, step): uniform in the l_inf ball, or for l_2 a uniformly
    random direction with a radius uniform in [0, eps] (torchattacks' PGDL2); then clipped to [0, 1]."""
    keys = [sample_seed(seed, i, START, step) for i in idx]
    if norm == "linf":
        delta = eps * (2 * keyed_uniform(keys, 0, x.shape[1:], x.device) - 1)
    else:
        z = keyed_normal(keys, 0, x.shape[1:], x.device)
        radius = eps * keyed_uniform(keys, 1, (1,), x.device).flatten()
        delta = z * per_sample(radius / z.flatten(1).norm(dim=1), z)
    return (x + delta.to(x.dtype)).clamp(0, 1)


# ---------------------------------------------------------------- evaluation and records

def measure(defense, x, y, idx, stage, step, protocol="single", draws=1):
    """A fresh evaluation of x: per image the prediction and CE loss of draw 0, the fraction of draws
    classified correctly, the protocol's score and the correctness of every draw (draws, B).
    Draws = max(draws, the protocol's N); the protocol uses the first N of them."""
    n = max(draws, parse_protocol(protocol)[1])
    logits = defense.predict(x, idx, stage, n, step)
    preds = logits.argmax(-1)
    correct = preds == y
    return {"pred": preds[0], "frac": correct.float().mean(0), "score": protocol_score(correct, protocol),
            "loss": F.cross_entropy(logits[0], y, reduction="none"), "correct": correct}


def evaluate(defense, x, y, idx, stage, draws=1, step=0):
    """(prediction of draw 0, correct fraction over the draws, CE loss of draw 0) per image."""
    m = measure(defense, x, y, idx, stage, step, "single", draws)
    return m["pred"], m["frac"], m["loss"]


def make_records(defense, x, x_adv, y, idx, clean, adv, protocol, **extra):
    """Per-image records from the clean and adversarial measurements (see `measure`); extra: per-image
    lists or tensors, or one value for all."""
    delta = (x_adv - x).flatten(1)
    clf_pred = defense.classifier_predict(x_adv, idx)
    records = []
    for k, i in enumerate(idx):
        r = {"index": i, "label": int(y[k]), "protocol": protocol,
             "clean_pred": int(clean["pred"][k]), "clean_correct_frac": float(clean["frac"][k]),
             "clean": float(clean["score"][k]),
             "pred": int(adv["pred"][k]), "robust_correct_frac": float(adv["frac"][k]),
             "robust": float(adv["score"][k]),
             "loss": float(adv["loss"][k]), "linf": float(delta[k].abs().max()), "l2": float(delta[k].norm()),
             "clf_pred": int(clf_pred[k])}
        for name, v in extra.items():
            v = v[k] if isinstance(v, (list, torch.Tensor)) else v
            r[name] = v.item() if isinstance(v, torch.Tensor) else v
        records.append(r)
    return records


# ---------------------------------------------------------------- PGD with EoT

def pgd_eot(defense, x, y, idx=None, eps=8 / 255, step_size=2 / 255, steps=20, eot=10, norm="linf",
            eval_draws=1, on_step=None, *, random_start=False, protocol="single", track="final",
            trajectory=False, trajectory_deltas=0, seed=None):
    """PGD with the gradient summed over `eot` draws per step (SPEC.md), then a fresh evaluation.
    Defaults are the paper's: delta starts at 0, protocol single, the final iterate reported.

    idx: the images' indices in the data set (they key the noise; default 0..B-1).
    random_start: start uniformly in the l_inf ball (l_2: random direction and radius), keyed by
      (seed, image) (seed None: the Defense's).
    protocol: how the clean image and the reported iterate are scored (see the module docstring);
      eval_draws > the protocol's N adds draws to the correct fractions only.
    track: 'final' reports iterate `steps`; 'best' evaluates every iterate after its step and keeps per
      image the one worst for the defence (lowest score; ties keep the earlier; the clean image is
      iterate 0), DiffBreak / DiffHammer style. Iterate s is always evaluated with the EVAL draws keyed
      by step s and the clean image with the CLEAN draws, and 'best' reports the kept iterate's own
      measurement; so 'best' picks from the candidates whose last one is exactly what 'final' reports,
      and never reports a higher score than 'final' on the same run.
    trajectory: True adds to each record "trajectory": {"loss": mean EoT loss of step k (taken at
      iterate k - 1), "score", "linf", "l2": of iterate k} (lists over k = 1..steps); a list instead
      receives one such dict per image ({"index": i, ...}), with "delta": the perturbations of iterates
      1..steps (steps, C, H, W) for the images with index < trajectory_deltas.
    Returns (x_adv, records)."""
    idx = list(range(len(x))) if idx is None else list(idx)
    if track not in ("final", "best"):
        raise ValueError(f"track must be 'final' or 'best', not {track!r}")
    if trajectory_deltas and not isinstance(trajectory, list):
        raise ValueError("trajectory_deltas needs trajectory=[] (a list that receives the tensors)")
    logging = trajectory is True or isinstance(trajectory, list)
    if not logging and trajectory not in (False, None):
        raise ValueError("trajectory must be True, False or a list to fill")
    seed = defense.seed if seed is None else seed
    per_step = track == "best" or logging
    clean = measure(defense, x, y, idx, CLEAN, 0, protocol, eval_draws)
    x_adv = pgd_start(x, idx, eps, norm, seed) if random_start else x.clone()
    kept_x, kept, kept_at = x.clone(), dict(clean), torch.zeros(len(x), dtype=torch.long, device=x.device)
    log = {"loss": [], "score": [], "linf": [], "l2": []}
    deltas = []

    def keep_worse(x_k, m, k):  # a strictly lower score replaces the kept iterate
        worse = m["score"] < kept["score"]
        kept_x[worse] = x_k[worse]
        kept_at[worse] = k
        for name in kept:
            kept[name] = torch.where(worse, m[name], kept[name])

    m = None
    for step in range(steps):
        g, loss, _ = defense.eot_gradient(x_adv, y, idx, step, eot)
        x_adv = pgd_step(x, x_adv, g, eps, step_size, norm)
        if per_step:
            m = measure(defense, x_adv, y, idx, EVAL, step + 1, protocol, eval_draws)
            if track == "best":
                keep_worse(x_adv, m, step + 1)
            delta = x_adv - x
            for name, v in [("loss", loss.mean(0)), ("score", m["score"]),
                            ("linf", delta.flatten(1).abs().max(1).values), ("l2", delta.flatten(1).norm(dim=1))]:
                log[name].append(v.tolist())
            if trajectory_deltas:
                deltas.append(delta.cpu())
        if on_step:
            on_step()
    final = m if m is not None else measure(defense, x_adv, y, idx, EVAL, steps, protocol, eval_draws)
    if track == "best" and steps == 0:  # the start (a random one, or x) against the clean image
        keep_worse(x_adv, final, 0)

    extra = {"track": track, "iterate": kept_at if track == "best" else steps}
    if track == "best":
        extra["robust_final"] = final["score"]
        x_adv, final = kept_x, kept
    records = make_records(defense, x, x_adv, y, idx, clean, final, protocol, **extra)
    if logging:
        for k, (r, i) in enumerate(zip(records, idx)):
            t = {name: [v[k] for v in values] for name, values in log.items()}
            if trajectory is True:
                r["trajectory"] = t
            else:
                if i < trajectory_deltas:
                    t["delta"] = torch.stack([d[k] for d in deltas]) if deltas else x[:0].cpu()
                trajectory.append({"index": i, **t})
    return x_adv, records


# ---------------------------------------------------------------- APGD (Croce & Hein 2020)

def apgd_start(x, idx, eps, norm, seed, step):
    """APGD's random start (as upstream): l_inf, t uniform in [-1, 1]^d scaled to max|t| = 1, so the start
    lies on the surface of the ball; l_2, a Gaussian direction of length eps. Keyed by (seed, image,
    step); clipped to [0, 1]."""
    keys = [sample_seed(seed, i, START, step) for i in idx]
    if norm == "linf":
        t = 2 * keyed_uniform(keys, 0, x.shape[1:], x.device) - 1
        t = t / per_sample(t.flatten(1).abs().max(1).values + 1e-12, t)
    else:
        t = keyed_normal(keys, 0, x.shape[1:], x.device)
        t = t / per_sample(t.flatten(1).norm(dim=1) + 1e-12, t)
    return (x + eps * t.to(x.dtype)).clamp(0, 1)


def apgd_project(x, v, eps, norm):
    """Onto the eps ball around x and into [0, 1], with upstream's arithmetic (so runs agree bit for bit):
    l_inf min/max against x -+ eps; l_2 rescales v - x to length min(eps, |v - x|)."""
    if norm == "linf":
        return torch.min(torch.max(v, x - eps), x + eps).clamp(0, 1)
    d = v - x
    d_norm = (d ** 2).sum(dim=tuple(range(1, x.dim())), keepdim=True).sqrt()
    return (x + d / (d_norm + 1e-12) * torch.clamp(d_norm, max=eps)).clamp(0, 1)


def apgd_direction(g, norm):
    if norm == "linf":
        return g.sign()
    return g / ((g ** 2).sum(dim=tuple(range(1, g.dim())), keepdim=True).sqrt() + 1e-12)


def apgd_run(defense, x, y, idx, x_start, loss_fn=ce_loss, norm="linf", eps=8 / 255, steps=100, eot=1, rho=0.75,
             first_step=0):
    """One APGD run from x_start (Croce & Hein 2020, Algorithm 1; upstream's attack_single_run).
    Step size eta = 2 eps; momentum alpha = 0.75 (none at the first step); checkpoints after intervals
    of 0.22, 0.19, ... 0.06 of `steps` (p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)), where eta
    halves for the images whose loss rose in at most rho of the interval's steps (condition 1) or whose
    best loss did not improve since the last checkpoint while eta was not halved then (condition 2),
    and those restart from their best point.

    EoT: the gradient of iterate j is the mean over `eot` draws, keyed (image, first_step + j, draw);
    the loss and prediction of an iterate are those of its last draw, as upstream (the EoT loop
    overwrites them); for eot = 1 this is plain APGD. As upstream, the first checkpoint compares the
    first step's loss with losses[-1], still 0 (the paper would compare with the starting loss).

    Returns a dict: x_best (the highest-loss iterate) and loss_best; robust (no iterate's draw was
    misclassified) and x_adv (the last misclassified iterate, else x_start); losses and step_sizes
    (steps, B) per iteration."""
    n_img = len(x)
    interval = max(int(0.22 * steps), 1)
    interval_min, interval_decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)

    def gradient(x_k, j):
        g, loss, logits = defense.eot_gradient(x_k, y, idx, first_step + j, eot, loss_fn)
        return g / eot, loss[-1], logits[-1].argmax(-1) == y

    x_k = x_start.clone()
    g, f, correct = gradient(x_k, 0)
    robust, x_adv = correct.clone(), x_k.clone()
    x_best, g_best, f_best = x_k.clone(), g.clone(), f.clone()
    eta = per_sample(torch.full((n_img,), 2 * eps, device=x.device), x)
    x_prev = x_k.clone()
    losses, step_sizes = torch.zeros(steps, n_img, device=x.device), torch.zeros(steps, n_img, device=x.device)
    since_check, f_best_at_check = 0, f_best.clone()
    halved_at_check = torch.ones(n_img, dtype=torch.bool, device=x.device)
    for i in range(steps):
        alpha = 0.75 if i > 0 else 1.0
        step_sizes[i] = eta.flatten()
        z = apgd_project(x, x_k + eta * apgd_direction(g, norm), eps, norm)
        x_prev, x_k = x_k, apgd_project(x, x_k + (z - x_k) * alpha + (x_k - x_prev) * (1 - alpha), eps, norm)
        g, f, correct = gradient(x_k, i + 1)
        robust &= correct
        x_adv[~correct] = x_k[~correct]
        losses[i] = f
        better = f > f_best
        x_best[better], g_best[better], f_best[better] = x_k[better], g[better], f[better]

        since_check += 1
        if since_check == interval:  # a checkpoint
            rises = sum((losses[i - c] > losses[i - c - 1]).float() for c in range(interval))
            halve = (rises <= interval * rho) | (~halved_at_check & (f_best_at_check >= f_best))
            halved_at_check, f_best_at_check = halve, f_best.clone()
            eta[halve] /= 2
            x_k[halve], g[halve] = x_best[halve], g_best[halve]
            since_check, interval = 0, max(interval - interval_decr, interval_min)
    return {"x_best": x_best, "loss_best": f_best, "robust": robust, "x_adv": x_adv, "losses": losses,
            "step_sizes": step_sizes}


def apgd_attack(defense, x, y, idx, loss="ce", norm="linf", eps=8 / 255, steps=100, restarts=1, eot=1, rho=0.75,
                seed=0, keep="misclassified", first_step=0):
    """APGD with restarts (upstream's perturb), as tensors: (x_adv, broken (B,) bool, loss_best (B,)).
    keep='misclassified' (upstream's default): only images still classified correctly are attacked
    (first by one clean prediction, keyed CHECK / first_step), and x_adv is the last iterate one of
    whose draws misclassified the image, else the clean image. keep='max-loss' (upstream's
    best_loss=True): every restart attacks every image and x_adv is the highest-loss iterate.
    Restart r starts at apgd_start(seed, image, first_step + r) and keys its gradients
    first_step + r (steps + 1) + j, j = 0..steps."""
    if keep not in ("misclassified", "max-loss"):
        raise ValueError(f"keep must be 'misclassified' or 'max-loss', not {keep!r}")
    if loss not in LOSSES or norm not in BUDGETS:
        raise ValueError(f"loss must be one of {list(LOSSES)} and norm one of {list(BUDGETS)}")
    x_adv = x.clone()
    loss_best = torch.full((len(x),), -math.inf, device=x.device)
    if keep == "misclassified":
        robust = defense.predict(x, idx, CHECK, 1, first_step)[0].argmax(-1) == y
    else:
        robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for r in range(restarts):
        todo = robust.nonzero().flatten() if keep == "misclassified" else torch.arange(len(x), device=x.device)
        if len(todo) == 0:
            break
        sub = [idx[k] for k in todo.tolist()]
        start = apgd_start(x[todo], sub, eps, norm, seed, first_step + r)
        out = apgd_run(defense, x[todo], y[todo], sub, start, LOSSES[loss], norm, eps, steps, eot, rho,
                       first_step + r * (steps + 1))
        if keep == "misclassified":
            broken = ~out["robust"]
            robust[todo[broken]] = False
            x_adv[todo[broken]] = out["x_adv"][broken]
        else:
            better = out["loss_best"] > loss_best[todo]
            x_adv[todo[better]] = out["x_best"][better]
        loss_best[todo] = torch.maximum(loss_best[todo], out["loss_best"])
    broken = ~robust if keep == "misclassified" else torch.zeros_like(robust)
    return x_adv, broken, loss_best


def apgd(defense, x, y, idx=None, loss="ce", norm="linf", eps=None, steps=100, restarts=1, eot=1, rho=0.75,
         seed=None, keep="misclassified", first_step=0, protocol="single", eval_draws=1):
    """APGD-CE or APGD-DLR (Croce & Hein 2020) on the defence, l_inf or l_2 (eps default 8/255 or 0.5),
    with EoT over `eot` draws per iterate (see apgd_run and apgd_attack; seed None: the Defense's).
    On a deterministic model this is upstream's APGD step for step. Then a fresh evaluation of the
    clean and the returned images under `protocol`, as pgd_eot.
    Returns (x_adv, records); records add "attack", "broken" (upstream's flag: a draw misclassified
    an iterate; always false for keep='max-loss') and "max_loss" (the best loss over restarts)."""
    idx = list(range(len(x))) if idx is None else list(idx)
    eps = BUDGETS[norm] if eps is None else eps
    seed = defense.seed if seed is None else seed
    x_adv, broken, loss_best = apgd_attack(defense, x, y, idx, loss, norm, eps, steps, restarts, eot, rho, seed,
                                           keep, first_step)
    clean = measure(defense, x, y, idx, CLEAN, 0, protocol, eval_draws)
    adv = measure(defense, x_adv, y, idx, EVAL, 0, protocol, eval_draws)
    return x_adv, make_records(defense, x, x_adv, y, idx, clean, adv, protocol, attack=f"apgd-{loss}", norm=norm,
                               keep=keep, broken=broken.tolist(), max_loss=loss_best.tolist())


# ---------------------------------------------------------------- AutoAttack, rand version

def autoattack_rand(defense, x, y, idx=None, norm="linf", eps=None, version="fixed", eot=20, steps=100,
                    eval_draws=20, seed=None, rho=0.75, protocol="single"):
    """AutoAttack's rand version: APGD-CE then APGD-DLR, one restart each, EoT over `eot` draws per
    iterate, each attack starting from the clean images (upstream autoattack.py, set_version('rand')).

    version 'upstream' (fra31/auto-attack a39220048b3c9f2cca9a4d3a54604793c68eca7e, autoattack.py
    run_standard_evaluation): an image counts as broken as soon as ONE stochastic forward pass
    misclassifies it (at the clean image or on an attack's output); it is then attacked no more and
    keeps that example. version 'fixed' (the ADDT paper, appendix I; SPEC.md "Fixed AutoAttack"): each
    candidate is classified `eval_draws` times and an image keeps the fraction classified correctly;
    its example is replaced only when the new fraction is lower; every image with a fraction above 0
    goes into the next attack. Upstream is the same rule with one draw (the fraction is then 0 or 1),
    so both share this code. The upstream lines the fix changes (autoattack.py at that commit):
      #125           robust_flags = torch.zeros(..., dtype=torch.bool): a flag -> a fraction (`score`)
      #129, #133-136 the clean accuracy, one get_logits pass per batch -> eval_draws passes, their fraction
      #157           num_robust = torch.sum(robust_flags): images flagged -> images with a fraction above 0
      #221-225       one get_logits pass on adv_curr, false_batch, robust_flags[...] = False ->
                     eval_draws passes, the fraction kept where lower
      #227-228       x_adv / y_adv replaced where false_batch -> where the fraction is lower
      #231           the verbose count of broken images -> of lowered fractions
    Inside APGD nothing changes (keep='misclassified', its one-pass clean check included).

    Returns (x_adv, records): the records of pgd_eot for a fresh evaluation under `protocol` (clean,
    robust, ...), plus "version", "aa_clean" and "aa_robust" (the image's score as AutoAttack reports it:
    0/1 upstream, the fraction when fixed; the mean of aa_robust is AutoAttack's robust accuracy),
    "aa_after_ce", "aa_after_dlr" and "aa_kept" (which attack's example x_adv holds, or "clean")."""
    if version not in ("fixed", "upstream"):
        raise ValueError(f"version must be 'fixed' or 'upstream', not {version!r}")
    idx = list(range(len(x))) if idx is None else list(idx)
    eps = BUDGETS[norm] if eps is None else eps
    seed = defense.seed if seed is None else seed
    checks = eval_draws if version == "fixed" else 1
    clean = measure(defense, x, y, idx, CLEAN, 0, protocol, checks)
    score = clean["correct"][:checks].float().mean(0)  # AutoAttack's clean check: the first draws
    aa_clean, after, kept = score.clone(), {}, ["clean"] * len(x)
    x_adv = x.clone()
    for a, loss in enumerate(("ce", "dlr")):
        todo = (score > 0).nonzero().flatten()
        if len(todo):
            sub = [idx[k] for k in todo.tolist()]
            adv, _, _ = apgd_attack(defense, x[todo], y[todo], sub, loss, norm, eps, steps, 1, eot, rho, seed,
                                    "misclassified", a * (steps + 1))
            frac = (defense.predict(adv, sub, EVAL, checks, a + 1).argmax(-1) == y[todo]).float().mean(0)
            lower = frac < score[todo]
            score[todo[lower]] = frac[lower]
            x_adv[todo[lower]] = adv[lower]
            for k in todo[lower].tolist():
                kept[k] = f"apgd-{loss}"
        after[f"aa_after_{loss}"] = score.clone()
    adv = measure(defense, x_adv, y, idx, EVAL, 0, protocol, checks)
    return x_adv, make_records(defense, x, x_adv, y, idx, clean, adv, protocol, version=version,
                               aa_clean=aa_clean, aa_robust=score, aa_kept=kept, **after)


# ---------------------------------------------------------------- summaries

def wilson_interval(successes, n, z=1.96):
    """Wilson score interval (lo, hi) in percent for `successes` out of n. Fractional successes (the sum of
    mean-K fractions) are accepted: a [0, 1]-valued score with mean m has variance at most m (1 - m), so
    the interval is conservative for the spread over images (it ignores nothing, but is wider than
    needed when the fractions are far from 0 and 1)."""
    if n == 0:
        return 0.0, 100.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, center - half), 100 * min(1.0, center + half)


def summarize_records(records):
    """Accuracies (percent) over records of one protocol: clean and robust with Wilson intervals, the
    single-draw accuracies (draw 0, the paper's number when the protocol is single), the bare
    classifier's accuracy on the returned images (official all_cls_acc), and AutoAttack's own number
    when the records come from autoattack_rand."""
    n = len(records)
    protocols = {r["protocol"] for r in records}
    if len(protocols) != 1:
        raise ValueError(f"records of several protocols: {sorted(protocols)}")
    clean, robust = sum(r["clean"] for r in records), sum(r["robust"] for r in records)
    s = {"n": n, "protocol": protocols.pop(),
         "clean_accuracy": 100 * clean / n, "clean_ci": list(wilson_interval(clean, n)),
         "robust_accuracy": 100 * robust / n, "robust_ci": list(wilson_interval(robust, n)),
         "clean_accuracy_draw0": 100 * sum(r["clean_pred"] == r["label"] for r in records) / n,
         "robust_accuracy_draw0": 100 * sum(r["pred"] == r["label"] for r in records) / n,
         "classifier_accuracy_adv": 100 * sum(r["clf_pred"] == r["label"] for r in records) / n}
    if "track" in records[0]:
        s["track"] = records[0]["track"]
    if "robust_final" in records[0]:
        s["robust_accuracy_final"] = 100 * sum(r["robust_final"] for r in records) / n
    if "aa_robust" in records[0]:
        aa = sum(r["aa_robust"] for r in records)
        s.update(version=records[0]["version"], autoattack_clean_accuracy=100 * sum(r["aa_clean"] for r in records) / n,
                 autoattack_robust_accuracy=100 * aa / n, autoattack_robust_ci=list(wilson_interval(aa, n)))
    return s
