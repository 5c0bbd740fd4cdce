"""Speed of the costly parts: UNet passes, the PGD-EoT step, the ADDT step, RBGM and the fused step.

    python bench.py                          # on CUDA: full size (DDPM CIFAR-10 UNet, 64 images x EoT 10, NFE 100)
    python bench.py --small                  # tiny UNet, 2 images x EoT 2, NFE 5 (what CPU runs; CI checks it)
    python bench.py --only attack,memory     # some sections: unet, attack, addt, rbgm, step, memory, vpsde, edm
    python bench.py --small --compile-cpu    # also torch.compile on the CPU
    python bench.py --runbook                # the day a GPU is lent: tests, full bench, precision check, quick preset

Every comparison runs side by side in this one process; the table prints ratios and --out (default
runs/bench.json) holds every number with the device, versions and settings. Times are medians of
--repeats calls after a warm-up call, with torch.cuda.synchronize around each sample. Random weights
throughout: speed does not depend on them. The small version's numbers say only that the code runs.
"""
import argparse
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import attack
import train_addt
from addt_attacks import EVAL, Defense, evaluate
from addt_common import (UserError, autocast, load_kernel, check_device, check_out_dir, check_positive, format_seconds,
                         markdown_table, prepare_model, read_json, refuse_overwrite, require, resolve_precision,
                         run_main, write_json, write_text)
from addt_diffusion import (ddpm_purifier, edm_purifier, fresh_noise, linear_alpha_bar, make_schedule,
                            new_diffusion_model, vpsde_purifier)
from models import build_classifier
from models.unet import DDPM_CIFAR10_CONFIG, UNet

rbgm_module, step_module = load_kernel("rbgm"), load_kernel("ddpm_step")
rbgm, rbgm_reference, sorted_normal_rows = rbgm_module.rbgm, rbgm_module.rbgm_reference, rbgm_module.sorted_normal_rows
reverse_step, step_reference = step_module.reverse_step, step_module.step_reference

REPO = os.path.dirname(os.path.abspath(__file__))
PAPER = dict(images=1024, pgd_steps=20, evaluations=2)  # PGD20-EoT10 on 1024 images, clean + final evaluation
EPOCH_IMAGES, EPOCHS = 50_000, 100
TARGETS = dict(attack_speedup=20.0, epoch_s=80.0, rbgm_speedup=4.0, step_speedup=1.0)
# the score-based families at paper settings (VP-SDE: t* = 0.1, dt = 1e-3, 100 Euler steps; EDM: sigma_max
# 0.5, 50 Heun steps) and small ones for the CPU
FAMILIES_FULL = {"vpsde": dict(model=None, settings=dict(t_star=0.1, dt=1e-3), images=32, eot=10, official_draws=1),
                 "edm": dict(model=None, settings=dict(sigma_max=0.5, num_steps=50), images=64, eot=10,
                             official_draws=1)}
FAMILIES_SMALL = {"vpsde": dict(model=dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1), settings=dict(t_star=0.1, dt=0.02),
                                images=2, eot=2, official_draws=2),
                  "edm": dict(model=dict(model_channels=16, num_blocks=1), settings=dict(sigma_max=0.5, num_steps=3),
                              images=2, eot=2, official_draws=2)}
FULL = dict(unet=DDPM_CIFAR10_CONFIG, classifier="wrn-28-10", unet_batch=256, images=64, eot=10, nfe=100,
            official_draws=1, addt_batch=256, rbgm_shapes=[(128, 3, 32, 32), (1024, 3, 32, 32), (64, 3, 64, 64)],
            step_shape=(640, 3, 32, 32), repeats=5, families=FAMILIES_FULL)
SMALL = dict(unet=attack.TINY_UNET_CONFIG, classifier="wrn-10-1", unet_batch=8, images=2, eot=2, nfe=5,
             official_draws=2, addt_batch=8, rbgm_shapes=[(128, 3, 32, 32), (16, 3, 64, 64)],
             step_shape=(64, 3, 32, 32), repeats=3, families=FAMILIES_SMALL)
SECTIONS = ["unet", "attack", "addt", "rbgm", "step", "memory", "vpsde", "edm"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the small version (always on a CPU)")
    p.add_argument("--out", default="runs/bench.json")
    p.add_argument("--device", default=None, help="default cuda when there is one")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per number (default 5 full, 3 small)")
    p.add_argument("--compile-cpu", action="store_true", help="also torch.compile on the CPU (slow to compile)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--runbook", action="store_true", help="tests, full bench, the quick preset and the precision check, "
                   "one report under --runbook-out (what to run first whenever a GPU is lent)")
    p.add_argument("--runbook-steps", default=",".join(RUNBOOK_STEPS), help=f"some of {','.join(RUNBOOK_STEPS)}")
    p.add_argument("--runbook-out", default="runs/runbook")
    p.add_argument("--runbook-data", default=os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg"),
                   help="data for the quick preset and the precision check")
    p.add_argument("--step-timeout", type=int, default=3600, help="seconds a runbook step may take")
    p.add_argument("--pack-data", nargs=2, metavar=("SRC", "DEST"), default=None,
                   help="copy an image-folder data set (test.zip + the first --pack-train images of train.zip) to "
                        "DEST, small enough to travel to a lent GPU; then --runbook-data DEST")
    p.add_argument("--pack-train", type=int, default=25000)
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.runbook_steps = [s for s in args.runbook_steps.split(",") if s]
    if args.pack_data:
        check_positive(args, "pack_train")
        require(all(os.path.isfile(os.path.join(args.pack_data[0], f"{s}.zip")) for s in ("train", "test")),
                f"--pack-data: {args.pack_data[0]} holds no train.zip and test.zip")
        check_out_dir(args.pack_data[1])
        return args
    if args.runbook:
        require(set(args.runbook_steps) <= set(RUNBOOK_STEPS), f"--runbook-steps: choose from {RUNBOOK_STEPS}")
        check_device(args.device)
        check_out_dir(args.runbook_out)
        return args
    if not set(args.only) <= set(SECTIONS):
        raise UserError(f"--only: unknown section(s) {sorted(set(args.only) - set(SECTIONS))}; choose from {SECTIONS}")
    check_positive(args, "repeats")
    check_device(args.device)
    require(not os.path.isdir(args.out), f"--out {args.out} is a directory; bench.py writes one JSON file")
    check_out_dir(os.path.dirname(os.path.abspath(args.out)))
    refuse_overwrite(args.out, args.overwrite, "--overwrite to replace it")
    return args


# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, repeats, number=None):
    """Median seconds per call of fn() after one warm-up call (compilation, autotuning, allocator).
    number=None loops short calls so a sample lasts >= 20 ms: one timer pair cannot resolve a 50 us
    kernel. Long calls pass number=1 and skip the extra call that estimates it."""
    def sample(k):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / k

    sample(1)
    number = number or max(1, math.ceil(0.02 / sample(1)))
    return statistics.median(sample(number) for _ in range(repeats))


def peak_memory(fn, device):
    """Peak bytes allocated during fn() (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def amp(device, precision):
    """addt_common.autocast after setting the TF32 switches this precision asks for."""
    return autocast(device, resolve_precision(precision, device))


# ---------------------------------------------------------------- 1. UNet forward and input gradient

def count_flops(unet, x, t):
    """FLOPs of a forward and of a forward + input-gradient pass, counted once on one image of the eager
    model and scaled (both are linear in the batch; precision, layout and compile do not change them).
    The CPU's SDPA op is not in the counter's table, so there attention FLOPs are left out."""
    x1, t1 = x[:1].clone(), t[:1]
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        unet(x1, t1)
    x1.requires_grad_(True)
    with FlopCounterMode(display=False) as both:  # .backward(): the counter's hooks refuse autograd.grad here
        unet(x1, t1).sum().backward()
    return fwd.get_total_flops() * len(x), both.get_total_flops() * len(x)


# (name, precision, channels_last, compile); tf32 exists only on CUDA, the CPU compiles on request
UNET_SETTINGS = [("fp32", "fp32", False, False), ("tf32", "tf32", False, False), ("bf16", "bf16", False, False),
                 ("bf16+channels_last", "bf16", True, False), ("bf16+channels_last+compile", "bf16", True, True)]


def bench_unet(unet, size, device, repeats, compile_cpu):
    n, cuda = size["unet_batch"], device.type == "cuda"
    x, t = torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 1000, (n,), device=device)
    flops_fwd, flops_grad = count_flops(unet, x, t)
    rows = []
    for name, precision, channels_last, compile in UNET_SETTINGS:
        if not cuda and (precision == "tf32" or compile and not compile_cpu):
            continue
        model = prepare_model(copy.deepcopy(unet), device, channels_last, compile)
        xi = x.to(memory_format=torch.channels_last) if channels_last else x
        xg = xi.clone().requires_grad_(True)

        def forward():
            with torch.no_grad(), amp(device, precision):
                model(xi, t)

        def input_grad():
            with amp(device, precision):
                out = model(xg, t)
            torch.autograd.grad(out.sum(), xg)  # outside autocast, as torch.autocast asks

        s_fwd, s_grad = seconds(forward, device, repeats), seconds(input_grad, device, repeats)
        rows.append({"setting": name, "fwd img/s": n / s_fwd, "fwd TFLOP/s": flops_fwd / s_fwd / 1e12,
                     "fwd+grad img/s": n / s_grad, "fwd+grad TFLOP/s": flops_grad / s_grad / 1e12})
    return {"batch": n, "gflop_per_image_fwd": flops_fwd / n / 1e9,
            "gflop_per_image_fwd_grad": flops_grad / n / 1e9, "rows": rows}


# ---------------------------------------------------------------- 2. one PGD-EoT step

class OfficialScheduler:
    """What a scheduler object does in the official-style code (diffusers DDPMScheduler.step with
    fixed_large variance and clipping): each step re-derives its coefficients from alpha_bar with
    small tensor ops, where our path reads one precomputed row of Schedule.coefs."""

    def __init__(self, timesteps, device):
        self.alpha_bar, self.timesteps = linear_alpha_bar().to(device), timesteps

    def step(self, eps, i, x_t, z):
        t = self.timesteps[i]
        ab_t = self.alpha_bar[t]
        ab_prev = self.alpha_bar[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else torch.ones_like(ab_t)
        beta_t = 1 - ab_t / ab_prev
        a, b = ab_t.rsqrt(), (1 - ab_t).sqrt() / ab_t.sqrt()
        c0 = ab_prev.sqrt() * beta_t / (1 - ab_t)
        cx = (ab_t / ab_prev).sqrt() * (1 - ab_prev) / (1 - ab_t)
        return step_reference(x_t, eps, z, a, b, c0, cx, 0.0, beta_t.sqrt() if t > 0 else 0.0)


def official_purify(unet, x, timesteps):
    scheduler = OfficialScheduler(timesteps, x.device)  # a new object per purification, as the official loop
    ab = scheduler.alpha_bar[timesteps[0]]
    x_t = ab.sqrt() * (2 * x - 1) + (1 - ab).sqrt() * torch.randn_like(x)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        eps = checkpoint(unet, x_t, t_batch, use_reentrant=False) if torch.is_grad_enabled() else unet(x_t, t_batch)
        x_t = scheduler.step(eps, i, x_t, torch.randn_like(x_t) if t > 0 else None)
    return (x_t + 1) / 2


def official_eot_gradient(unet, classifier, x, y, timesteps, draws):
    """fp32 eager, one EoT draw after another with batch = images, weights requiring grad."""
    g = torch.zeros_like(x)
    for _ in range(draws):
        x_d = x.detach().requires_grad_(True)
        F.cross_entropy(classifier(official_purify(unet, x_d, timesteps)), y, reduction="sum").backward()
        g += x_d.grad  # .backward() also filled every weight's .grad: work the attack never uses
        unet.zero_grad(set_to_none=True)
        classifier.zero_grad(set_to_none=True)
    return g


def our_defense(unet, classifier, sched, size, device, compile_cpu):
    """addt_attacks.Defense with the fast settings: EoT draws batched in one chunk, bf16 on CUDA, frozen
    channels_last weights, compile on CUDA; reverse_step picks the fused kernel on CUDA."""
    n, eot = size["images"], size["eot"]
    compile = device.type == "cuda" or compile_cpu
    purifier = ddpm_purifier(prepare_model(copy.deepcopy(unet), device, True, compile), sched)
    return Defense(purifier, prepare_model(copy.deepcopy(classifier), device, True, compile), "white-box",
                   chunk=n * eot, precision=resolve_precision("auto", device))


def paper_projection(step_s, eval_s, images):
    """Wall time of PGD20-EoT on 1024 images in batches of `images`: 20 gradient steps and the clean and
    final evaluations per batch (at this run's EoT and NFE; the full size is the paper's setting)."""
    return math.ceil(PAPER["images"] / images) * (PAPER["pgd_steps"] * step_s + PAPER["evaluations"] * eval_s)


def bench_attack(unet, classifier, size, device, repeats, compile_cpu):
    n, eot, draws = size["images"], size["eot"], size["official_draws"]
    sched = make_schedule("ddpm", size["nfe"])
    x, y = torch.rand(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    off_unet = copy.deepcopy(unet).to(device).eval().requires_grad_(True)
    off_clf = copy.deepcopy(classifier).to(device).eval().requires_grad_(True)
    defense = our_defense(unet, classifier, sched, size, device, compile_cpu)
    idx = list(range(n))
    if device.type == "cuda":  # the official path is strict fp32; cuDNN's default would run convolutions in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fns = {"official": (lambda: official_eot_gradient(off_unet, off_clf, x, y, sched.timesteps, draws),
                        lambda: off_clf(official_purify(off_unet, x, sched.timesteps)).argmax(1)),
           "ours": (lambda: defense.eot_gradient(x, y, idx, 0, eot),
                    lambda: evaluate(defense, x, y, idx, EVAL, 1))}
    out = {"images": n, "eot": eot, "nfe": size["nfe"], "model_calls": len(sched.timesteps), "rows": []}
    memory = {}
    for name, (grad_fn, eval_fn) in fns.items():
        pipelines = n * (draws if name == "official" else eot)
        step_s = seconds(grad_fn, device, repeats, number=1)
        with torch.no_grad():
            eval_s = seconds(eval_fn, device, repeats, number=1)
        step_s *= n * eot / pipelines  # official: its draws run one after another, so EoT scales linearly
        out["rows"].append({"path": name, "pipelines/s": n * eot / step_s, "step s": step_s, "eval s": eval_s,
                            "1024-img PGD20 s": paper_projection(step_s, eval_s, n)})
        if device.type == "cuda":
            memory[f"{name} GiB"] = peak_memory(grad_fn, device) / 2 ** 30
    out["speedup"] = out["rows"][1]["pipelines/s"] / out["rows"][0]["pipelines/s"]
    return out, memory or {"skipped": "needs CUDA (torch.cuda.max_memory_allocated)"}


# ---------------------------------------------------------------- 7-8. the score-based families

def family_purifier(family, model, settings):
    return (vpsde_purifier if family == "vpsde" else edm_purifier)(model, **settings)


def official_family_gradient(purifier, classifier, x, y, draws):
    """Official-style: fp32, one EoT draw after another with batch = images, weights requiring grad,
    checkpointing per network call (as ADDT's attack scripts)."""
    purifier.grad_checkpoint = True
    g = torch.zeros_like(x)
    for _ in range(draws):
        x_d = x.detach().requires_grad_(True)
        F.cross_entropy(classifier(purifier(x_d, fresh_noise())), y, reduction="sum").backward()
        g += x_d.grad
        purifier.model.zero_grad(set_to_none=True)
        classifier.zero_grad(set_to_none=True)
    return g


def bench_family(family, classifier, size, device, repeats, compile_cpu):
    """One PGD-EoT step of DiffPure's VP-SDE or ADDT's EDM purification, ours vs official-style."""
    f = size["families"][family]
    n, eot, draws = f["images"], f["eot"], f["official_draws"]
    torch.manual_seed(0)
    model = new_diffusion_model(family, f["model"]).eval()
    x, y = torch.rand(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    off = family_purifier(family, copy.deepcopy(model).to(device).requires_grad_(True), f["settings"])
    off_clf = copy.deepcopy(classifier).to(device).eval().requires_grad_(True)
    compile = device.type == "cuda" or compile_cpu
    ours = Defense(family_purifier(family, prepare_model(copy.deepcopy(model), device, True, compile), f["settings"]),
                   prepare_model(copy.deepcopy(classifier), device, True, compile), "white-box", chunk=n * eot,
                   precision=resolve_precision("auto", device))
    idx = list(range(n))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fns = {"official": (lambda: official_family_gradient(off, off_clf, x, y, draws),
                        lambda: off_clf(off(x, fresh_noise())).argmax(1)),
           "ours": (lambda: ours.eot_gradient(x, y, idx, 0, eot), lambda: evaluate(ours, x, y, idx, EVAL, 1))}
    out = {"family": family, "images": n, "eot": eot, "model_calls": off.info["model_calls"],
           "settings": f["settings"], "rows": []}
    for name, (grad_fn, eval_fn) in fns.items():
        pipelines = n * (draws if name == "official" else eot)
        step_s = seconds(grad_fn, device, repeats, number=1) * n * eot / pipelines
        with torch.no_grad():
            eval_s = seconds(eval_fn, device, repeats, number=1)
        row = {"path": name, "pipelines/s": n * eot / step_s, "step s": step_s, "eval s": eval_s,
               "1024-img PGD20 s": paper_projection(step_s, eval_s, n)}
        if device.type == "cuda":
            row["peak GiB"] = peak_memory(grad_fn, device) / 2 ** 30
        out["rows"].append(row)
    out["speedup"] = out["rows"][1]["pipelines/s"] / out["rows"][0]["pipelines/s"]
    return out


# ---------------------------------------------------------------- 3. one ADDT training step

def bench_addt(size, classifier, device, repeats):
    """train_addt.train_step as train_addt.main runs it: CGPO (5 iterations, RBGM), then the update and EMA."""
    n = size["addt_batch"]
    # parse_args wants a classifier path for CE guidance; train_step takes the model, so the path is unused
    args = train_addt.parse_args(["--init", "scratch", "--perturb", "rbgm", "--classifier", "-", "--precision", "auto"])
    precision = resolve_precision(args.precision, device)
    model = UNet(size["unet"]).to(device).train()
    train_addt.set_dropout(model, args.dropout)
    clf = copy.deepcopy(classifier).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    ema = train_addt.EMA(model, args.ema_inv_gamma, args.ema_power, args.ema_max_decay)
    family = train_addt.DDPM(device)
    g = torch.Generator(device=device).manual_seed(0)
    batch = [(torch.rand(n, 3, 32, 32, device=device) * 2 - 1, torch.randint(0, 10, (n,), device=device))]
    step_s = seconds(lambda: train_addt.train_step(model, model, family, clf, ema, opt, batch, args, g,
                                                   lambda: autocast(device, precision)), device, repeats, number=1)
    epoch_s = EPOCH_IMAGES / (n / step_s)
    return {"batch": n, "cgpo_iters": args.cgpo_iters, "precision": precision, "step s": step_s,
            "img/s": n / step_s, "epoch s": epoch_s, f"{EPOCHS} epochs s": EPOCHS * epoch_s}


# ---------------------------------------------------------------- 4. RBGM and 5. the fused step

def bench_rbgm(shapes, device, repeats, kernel):
    rows = []
    for shape in shapes:
        delta = torch.randn(shape, device=device)
        r, n = delta.numel() // (shape[-2] * shape[-1]), shape[-2] * shape[-1]
        g = torch.Generator(device=device).manual_seed(0)
        normal = sorted_normal_rows(r, n, g, device)
        fns = {"sample (order stats)": lambda: sorted_normal_rows(r, n, g, device),
               "sample (randn+sort)": lambda: torch.randn(r, n, generator=g, device=device).sort(dim=1).values,
               "map (reference)": lambda: rbgm_reference(delta, normal),
               "rbgm (reference)": lambda: rbgm(delta, g, use_kernel=False),
               "rbgm (reference, randn+sort)": lambda: rbgm_reference(
                   delta, torch.randn(r, n, generator=g, device=device).sort(dim=1).values)}
        if kernel:
            fns["map (kernel)"] = lambda: rbgm_module._rbgm_kernel_launch(delta, normal)
            fns["rbgm (kernel)"] = lambda: rbgm(delta, g, use_kernel=True)
        ms = {k: 1e3 * seconds(f, device, repeats) for k, f in fns.items()}
        row = {"shape": "x".join(map(str, shape)), **{f"{k} ms": v for k, v in ms.items()}}
        if kernel:
            row["kernel speedup"] = ms["rbgm (reference)"] / ms["rbgm (kernel)"]
            row["kernel speedup vs sort"] = ms["rbgm (reference, randn+sort)"] / ms["rbgm (kernel)"]
        rows.append(row)
    return rows


def bench_step(shape, device, repeats, kernel):
    """eps is bf16 on CUDA, as the bf16 UNet hands it to the step in the attack; x_t and z are fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    x, z = (torch.randn(shape, generator=g, device=device) for _ in range(2))
    eps = torch.randn(shape, generator=g, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    coefs = [c.to(device).expand(shape[0]).contiguous() for c in make_schedule("ddpm", 100).coefs[50]]
    xg, eg, gout = x.clone().requires_grad_(True), eps.clone().requires_grad_(True), torch.randn_like(x)
    rows = []
    for use_kernel in [False, True] if kernel else [False]:
        def fwd():
            return reverse_step(x, eps, z, *coefs, use_kernel=use_kernel)

        def both():
            return torch.autograd.grad(reverse_step(xg, eg, z, *coefs, use_kernel=use_kernel), (xg, eg), gout)

        with torch.no_grad():
            fwd_ms = 1e3 * seconds(fwd, device, repeats)
        rows.append({"step": "fused" if use_kernel else "eager", "fwd ms": fwd_ms,
                     "fwd+bwd ms": 1e3 * seconds(both, device, repeats)})
    if kernel:
        for k in ("fwd ms", "fwd+bwd ms"):
            rows[1][k.replace("ms", "speedup")] = rows[0][k] / rows[1][k]
    return {"shape": "x".join(map(str, shape)), "eps_dtype": str(eps.dtype), "rows": rows}


# ---------------------------------------------------------------- the GPU runbook

RUNBOOK_STEPS = ["tests", "bench", "quick", "precision"]


def runbook_tests(args, out):
    """The whole suite on this machine (its CUDA tests run where CUDA is)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=args.step_timeout)
    last = [line for line in proc.stdout.strip().splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    write_text(os.path.join(out, "tests.log"), proc.stdout[-200000:] + proc.stderr[-20000:])
    return {"returncode": proc.returncode, "summary": last[-1] if last else proc.stdout[-500:]}


def runbook_bench(args, out):
    res = main(["--out", os.path.join(out, "bench.json"), "--overwrite", "--only", ",".join(args.only),
                *(["--small"] if args.small else []), *(["--device", args.device] if args.device else [])])
    a = {f: res[f] for f in ("attack", "vpsde", "edm") if f in res}
    return {"device": res["device"],
            "attack": {f: {"speedup": r["speedup"], "ours 1024-img PGD20 s": r["rows"][1]["1024-img PGD20 s"],
                           "official 1024-img PGD20 s": r["rows"][0]["1024-img PGD20 s"]} for f, r in a.items()},
            "addt_epoch_s": res.get("addt", {}).get("epoch s"),
            "rbgm_kernel_speedup": [r.get("kernel speedup") for r in res.get("rbgm", [])],
            "step": res.get("ddpm_step", {}).get("rows"), "memory": res.get("memory")}


def runbook_quick(args, out):
    """quick.py at the device's size (resumable: a second call continues where a killed one stopped)."""
    argv = [sys.executable, "quick.py", "--out", os.path.join(out, "quick")]
    argv += ["--size", "tiny", "--data", args.runbook_data] if args.small else []
    argv += ["--device", args.device] if args.device else []
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=args.step_timeout)
    write_text(os.path.join(out, "quick.log"), proc.stdout[-200000:] + proc.stderr[-20000:])
    if proc.returncode:
        raise RuntimeError(f"quick.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return read_json(os.path.join(out, "quick", "results.json"), "quick results")


def runbook_precision(args, out):
    """Robust accuracy with bf16 vs fp32 on the same images and seeds (PGD20-EoT10 l_inf, DP_DDPM NFE 10),
    with the quick preset's ADDT model and classifier; the smoke models when the preset has not run."""
    quick = os.path.join(out, "quick")
    models = {"ddpm": os.path.join(quick, "addt", "ema"), "classifier": os.path.join(quick, "classifier", "classifier.pt"),
              "data": args.runbook_data}
    if not (os.path.isdir(models["ddpm"]) and os.path.isfile(models["classifier"])):
        models = attack.make_smoke_inputs(os.path.join(out, "smoke-inputs"))
    n, steps, eot = (4, 2, 2) if args.small else (1024, 20, 10)
    res = {}
    for precision in ("fp32", "bf16"):
        argv = ["--defense", "ddpm", "--nfe", "10", "--ddpm", models["ddpm"], "--classifier", models["classifier"],
                "--data", models["data"], "--n", str(n), "--steps", str(steps), "--eot", str(eot), "--chunk",
                str(min(640, n * eot)), "--batch-size", str(min(64, n)), "--precision", precision,
                "--out", os.path.join(out, f"precision-{precision}"), *(["--device", args.device] if args.device else [])]
        if os.path.isdir(os.path.join(out, f"precision-{precision}")):
            argv.append("--resume")
        s = attack.main(argv)
        res[precision] = {k: s[k] for k in ("clean_accuracy", "robust_accuracy", "robust_ci", "seconds")}
    recs = [attack.read_records(os.path.join(out, f"precision-{p}")) for p in ("fp32", "bf16")]
    res["images_deciding_differently"] = sum(recs[0][i]["robust"] != recs[1][i]["robust"] for i in recs[0])
    res["robust_difference_points"] = res["bf16"]["robust_accuracy"] - res["fp32"]["robust_accuracy"]
    res["models"] = models
    return res


def runbook_markdown(report):
    """The report, and the rows for the README's GPU table."""
    lines = [f"# GPU runbook ({report.get('machine', '?')})", ""]
    for step in RUNBOOK_STEPS:
        r = report.get(step)
        if r is None:
            continue
        lines.append(f"## {step} ({format_seconds(r.get('seconds', 0))})")
        if "error" in r:
            lines.append(f"error: {r['error']}")
        elif step == "tests":
            lines.append(f"`pytest tests`: {r['summary']} (exit {r['returncode']})")
        elif step == "bench":
            rows = [{"pipeline": f, "speed-up vs official-style": f"{v['speedup']:.1f}x",
                     "1024-img PGD20 (ours)": format_seconds(v["ours 1024-img PGD20 s"]),
                     "1024-img PGD20 (official-style)": format_seconds(v["official 1024-img PGD20 s"])}
                    for f, v in r["attack"].items()]
            lines += [markdown_table(rows, list(rows[0])), ""] if rows else []
            lines.append(f"ADDT epoch: {r['addt_epoch_s']} s; RBGM kernel speed-up: {r['rbgm_kernel_speedup']}; "
                         f"fused step: {r['step']}; memory: {r['memory']}")
        elif step == "quick":
            lines.append(f"quick preset: see quick/README.md ({r.get('total_seconds', '?')} s)")
        elif step == "precision":
            lines.append(f"robust accuracy fp32 {r['fp32']['robust_accuracy']:.2f} vs bf16 {r['bf16']['robust_accuracy']:.2f} "
                         f"({r['robust_difference_points']:+.2f} points, {r['images_deciding_differently']} images differ)")
        lines.append("")
    return "\n".join(lines)


def pack_data(src, dest, train_images):
    """A copy of an image-folder data set small enough to travel with the repository to a lent GPU
    (64 MiB in all): test.zip whole, the first `train_images` of train.zip in the class-interleaved order
    (members copied as they are, no re-encoding)."""
    import zipfile
    from addt_data import interleave
    os.makedirs(dest, exist_ok=True)
    for split, keep in (("test", None), ("train", train_images)):
        with zipfile.ZipFile(os.path.join(src, f"{split}.zip")) as z:
            names = sorted(n for n in z.namelist() if not n.endswith("/"))
            if keep:  # <split>/<class>/<file>: the loader's class-interleaved order, cut
                by_class = {}
                for n in names:
                    by_class.setdefault(n.rsplit("/", 2)[-2], []).append(n)
                names = [n for _, n in interleave([by_class[c] for c in sorted(by_class)])][:keep]
            with zipfile.ZipFile(os.path.join(dest, f"{split}.zip.tmp"), "w") as out:
                for n in names:
                    out.writestr(z.getinfo(n), z.read(n))
        os.replace(os.path.join(dest, f"{split}.zip.tmp"), os.path.join(dest, f"{split}.zip"))
    sizes = {f: os.path.getsize(os.path.join(dest, f)) / 2 ** 20 for f in ("train.zip", "test.zip")}
    print(f"packed {src} -> {dest}: " + ", ".join(f"{f} {mb:.1f} MiB" for f, mb in sizes.items()))
    return sizes


def runbook(args):
    """Whenever a GPU is lent, this runs first: the tests, the full bench, the quick preset at GPU size and
    the precision check, each step's results merged into OUT/runbook.json and OUT/runbook.md. Steps can be
    run one per command (`--runbook-steps bench`): the device tool allows 10 minutes a command; a step
    that was interrupted is continued by running it again."""
    out = args.runbook_out
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "runbook.json")
    report = read_json(path, "runbook report") if os.path.exists(path) else {}
    report["machine"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    steps = {"tests": runbook_tests, "bench": runbook_bench, "quick": runbook_quick, "precision": runbook_precision}
    for step in args.runbook_steps:
        print(f"\n=== runbook: {step}", flush=True)
        t0 = time.time()
        try:
            report[step] = steps[step](args, out)
        except (Exception, SystemExit) as e:  # a failed step is reported, the next ones still run
            report[step] = {"error": f"{type(e).__name__}: {e}"}
        report[step]["seconds"] = time.time() - t0
        write_json(path, report)
        write_text(os.path.join(out, "runbook.md"), runbook_markdown(report))
    print(runbook_markdown(report))
    return report


# ---------------------------------------------------------------- main

def fmt(row):
    return {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}


def table(title, rows):
    print(f"\n## {title}\n" + markdown_table([fmt(r) for r in rows], list(rows[0])), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.pack_data:
        return pack_data(*args.pack_data, args.pack_train)
    if args.runbook:
        return runbook(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = SMALL if args.small or device.type == "cpu" else FULL
    repeats = args.repeats or size["repeats"]
    only = args.only
    # kernels are timed on CUDA only: on the CPU they run in the Triton interpreter, which is no speed
    kernels = rbgm_module.triton is not None and device.type == "cuda"
    torch.manual_seed(0)
    unet = UNet(size["unet"]).eval().requires_grad_(False)
    classifier = build_classifier(size["classifier"], 10).eval().requires_grad_(False)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    res = {"device": name, "torch": torch.__version__, "triton": getattr(rbgm_module.triton, "__version__", None),
           "settings": {**vars(args), "small": size is SMALL, "repeats": repeats, **size}}
    print(f"bench on {name}, torch {res['torch']}, triton {res['triton']}, {'small' if size is SMALL else 'full'} size")

    if "unet" in only:
        res["unet"] = bench_unet(unet, size, device, repeats, args.compile_cpu)
        table(f"1. UNet, batch {size['unet_batch']}, {res['unet']['gflop_per_image_fwd']:.3g} GFLOP/img forward",
              res["unet"]["rows"])
    if "attack" in only or "memory" in only:
        res["attack"], memory = bench_attack(unet, classifier, size, device, repeats, args.compile_cpu)
        a = res["attack"]
        table(f"2. PGD-EoT step: {a['images']} images x EoT {a['eot']}, {a['model_calls']} UNet calls",
              [{**r, "1024-img PGD20 s": format_seconds(r["1024-img PGD20 s"])} for r in a["rows"]])
        print(f"speed-up {a['speedup']:.2f}x (target >= {TARGETS['attack_speedup']:g}x at full size)")
    if "addt" in only:
        res["addt"] = r = bench_addt(size, classifier, device, repeats)
        table(f"3. ADDT step, batch {r['batch']}, {r['cgpo_iters']} CGPO iterations, {r['precision']}",
              [{**r, f"{EPOCHS} epochs s": format_seconds(r[f"{EPOCHS} epochs s"])}])
        print(f"target: epoch <= {TARGETS['epoch_s']:g} s at full size")
    if "rbgm" in only:
        res["rbgm"] = bench_rbgm(size["rbgm_shapes"], device, repeats, kernels)
        # a variant per row and a shape per column: the variants' names do not fit across
        table(f"4. RBGM (kernel target >= {TARGETS['rbgm_speedup']:g}x, never slower)",
              [{"variant": k, **{r["shape"]: r[k] for r in res["rbgm"]}} for k in res["rbgm"][0] if k != "shape"])
    if "step" in only:
        res["ddpm_step"] = s = bench_step(size["step_shape"], device, repeats, kernels)
        table(f"5. DDPM step {s['shape']}, eps {s['eps_dtype']} (fused target >= {TARGETS['step_speedup']:g}x)",
              s["rows"])
    if "memory" in only:
        res["memory"] = memory
        table("6. Peak GPU memory of the PGD-EoT step", [memory])
    for i, family in enumerate(("vpsde", "edm"), start=7):
        if family in only:
            res[family] = r = bench_family(family, classifier, size, device, repeats, args.compile_cpu)
            table(f"{i}. PGD-EoT step, {family}: {r['images']} images x EoT {r['eot']}, {r['model_calls']} network "
                  f"calls ({r['settings']})",
                  [{**row, "1024-img PGD20 s": format_seconds(row["1024-img PGD20 s"])} for row in r["rows"]])
            print(f"speed-up {r['speedup']:.2f}x")
    write_json(args.out, res)
    print(f"\n-> {args.out}")
    return res


if __name__ == "__main__":
    run_main(main)
