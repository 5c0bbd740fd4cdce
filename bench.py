"""Speed of the costly parts, measured side by side in one process: the UNet, one PGD-EoT step of every
family (the official-style path, attack.py's default and its --fast path, and the levers behind --fast),
the ADDT step, RBGM and the fused DDPM step; and the GPU check, which runs all of it within one lease.

    python bench.py                          # on CUDA: full size (DDPM CIFAR-10 UNet, WRN-28-10, NFE 100, EoT 10)
    python bench.py --small                  # tiny models (what the CPU runs; the tests check it)
    python bench.py --only attack,levers     # sections: unet attack addt rbgm step memory vpsde edm levers
    python bench.py --gpu-check              # the GPU check: one command, <= 9 min on one H100/H200 (below)
    python bench.py --pack-data ../shared/data/cifar10-jpeg .gpu/cifar10-jpeg   # data that travels to a GPU
    python bench.py --check-prepare          # CPU, once: the precision check's models into .gpu/models

Every attack row except the official one is a Defense built by attack.build_defense from attack.py's
own flags (`--fast`, `--grad-checkpoint selective`, `--compile-mode reduce-overhead`, ...), so a row
measures exactly what `python attack.py FLAGS` runs; a row times one chunk of the chunk that attack.py
would use (--chunk auto: sized from the free memory), and a row that runs out of memory or fails is
reported as that row's result. The table prints ratios to the official-style path (fp32, one EoT draw
after another, weight gradients on, per-call checkpointing, as the official code); --out (default
runs/bench.json) holds every number with the device, versions and settings. Times are medians of
--repeats calls after a first call (compilation, autotuning), with torch.cuda.synchronize around each.
Random weights throughout: speed does not depend on them. The small version's numbers say only that the
code runs.
"""
import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import signal
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
from addt_attacks import ATTACK, EVAL
from addt_common import (UserError, autocast, check_device, check_out_dir, check_positive, format_seconds,
                         load_kernel, markdown_table, prepare_model, read_json, refuse_overwrite, require,
                         resolve_precision, run_main, write_json, write_text)
from addt_diffusion import (build_purifier, fresh_noise, linear_alpha_bar, make_schedule, new_diffusion_model,
                            prepare)
from models import build_classifier
from models.unet import DDPM_CIFAR10_CONFIG, UNet

rbgm_module, step_module = load_kernel("rbgm"), load_kernel("ddpm_step")
rbgm, rbgm_reference, sorted_normal_rows = rbgm_module.rbgm, rbgm_module.rbgm_reference, rbgm_module.sorted_normal_rows
reverse_step, step_reference = step_module.reverse_step, step_module.step_reference

REPO = os.path.dirname(os.path.abspath(__file__))
PAPER = dict(images=1024, pgd_steps=20, evaluations=2)  # PGD20-EoT10 on 1024 images, clean + final evaluation
EPOCH_IMAGES, EPOCHS = 50_000, 100
# issue 18: the fast path >= 20x the official-style one (DDPM NFE 100, WRN-28-10, PGD-EoT10), an ADDT epoch
# <= 60 s at batch 256, the RBGM kernel never slower than the reference (>= 2x at 128x3x32x32)
TARGETS = dict(attack_speedup=20.0, epoch_s=60.0, rbgm_speedup=2.0, step_speedup=1.0)

# the attack rows: (name, attack.py flags); "official" is the official-style path (its own code below)
ATTACK_ROWS = [("official", None), ("default", []), ("fast, eager", ["--fast", "--no-compile"]), ("fast", ["--fast"])]
# the levers behind --fast, each a row the GPU check measures, in the order they are worth trying;
# "{x2}" / "{x0.5}" stand for twice / half the chunk that --fast chose
LEVER_ROWS = [("fast, CUDA graphs", ["--fast", "--compile-mode", "reduce-overhead"]),
              ("fast, chunk x2", ["--fast", "--chunk", "{x2}"]),
              ("fast, no checkpointing", ["--fast", "--grad-checkpoint", "off"]),
              ("fast eager, selective checkpointing", ["--fast", "--no-compile", "--grad-checkpoint", "selective"]),
              ("fast, chunk x0.5", ["--fast", "--chunk", "{x0.5}"]),
              ("fast, max-autotune", ["--fast", "--compile-mode", "max-autotune"])]
ADDT_ROWS = [("default", []), ("fast, eager", ["--fast", "--no-compile"]), ("fast", ["--fast"])]

# attack.py flags of each family at the paper's settings (DDPM NFE 100; VP-SDE t* 0.1, dt 1e-3 = 100 Euler
# steps; EDM sigma_max 0.5, 50 Heun steps) and small ones for the CPU; `model`: the network's config
# (None: the paper's); `official_images`: the official-style path's batch (one EoT draw at a time)
FAMILIES_FULL = {"ddpm": dict(flags=["--nfe", "100"], model=DDPM_CIFAR10_CONFIG, official_images=64),
                 "vpsde": dict(flags=["--nfe", "100"], model=None, official_images=32),
                 "edm": dict(flags=["--edm-steps", "50"], model=None, official_images=64)}
FAMILIES_SMALL = {"ddpm": dict(flags=["--nfe", "5"], model=attack.TINY_UNET_CONFIG, official_images=2),
                  "vpsde": dict(flags=["--nfe", "5"], model=dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1),
                                official_images=2),
                  "edm": dict(flags=["--edm-steps", "3"], model=dict(model_channels=16, num_blocks=1),
                              official_images=2)}
FULL = dict(name="full", unet=DDPM_CIFAR10_CONFIG, classifier="wrn-28-10", unet_batch=256, eot=10, addt_batch=256,
            rbgm_shapes=[(128, 3, 32, 32), (1024, 3, 32, 32), (64, 3, 64, 64)], step_shape=(640, 3, 32, 32),
            repeats=5, long_repeats=3, eval="all", families=FAMILIES_FULL, attack_rows=ATTACK_ROWS)
# the GPU check's size: the full models, one timed call of the long ones (after the first), evaluations
# timed on the official-style path only (a third of a gradient elsewhere: about 3 % of an attack's time)
# and the rows in order of value: --fast first (a part stopped by its time limit keeps the rows it finished),
# "fast, eager" left to the levers part
CHECK = dict(FULL, name="check", repeats=3, long_repeats=1, eval="official",
             attack_rows=[ATTACK_ROWS[3], ATTACK_ROWS[0], ATTACK_ROWS[1]])
# small: attack rows without a --chunk of their own get --chunk 8 (the CPU would spend minutes on chunks
# of 64 of the tiny models)
SMALL = dict(name="small", unet=attack.TINY_UNET_CONFIG, classifier="wrn-10-1", unet_batch=8, eot=2, addt_batch=8,
             rbgm_shapes=[(128, 3, 32, 32), (16, 3, 64, 64)], step_shape=(64, 3, 32, 32), repeats=3,
             long_repeats=2, eval="all", families=FAMILIES_SMALL, chunk=8, attack_rows=ATTACK_ROWS)
SIZES = {"full": FULL, "check": CHECK, "small": SMALL}
SECTIONS = ["unet", "attack", "addt", "rbgm", "step", "memory", "vpsde", "edm", "levers"]
DEFAULT_SECTIONS = [s for s in SECTIONS if s != "levers"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the small version (always on a CPU); = --size small")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on CUDA, small on a CPU")
    p.add_argument("--out", default="runs/bench.json")
    p.add_argument("--device", default=None, help="default cuda when there is one")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per number (default 5 full, 3 small)")
    p.add_argument("--compile-cpu", action="store_true", help="also the compiled rows on the CPU (slow to compile)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--deadline", type=float, default=None, help="stop starting rows this close to this time "
                   "(seconds since the epoch; the GPU check gives each part its own)")
    g = p.add_argument_group("the GPU check (see README, 'The GPU check')")
    g.add_argument("--gpu-check", action="store_true", help="tests, attack steps, ADDT, kernels, UNet, VP-SDE/EDM, "
                   "precision, levers: each part in its own process, bounded by the time left; one report")
    g.add_argument("--check-out", default="runs/gpu-check", help="folder of the report (gpu-check.json, .md)")
    g.add_argument("--check-budget", type=float, default=510, help="seconds for the whole check (default 510: "
                   "8.5 min, inside the device tool's 10-minute command limit with the start-up)")
    g.add_argument("--check-parts", default=",".join(CHECK_PARTS), help=f"some of {','.join(CHECK_PARTS)}")
    g.add_argument("--check-resume", action="store_true", help="keep the parts an earlier check finished")
    g.add_argument("--check-data", default=os.path.join(".gpu", "cifar10-jpeg"),
                   help="image-folder data of the precision check (bench.py --pack-data makes it)")
    g.add_argument("--check-models", default=os.path.join(".gpu", "models"),
                   help="classifier.pt and ddpm/ for the precision check (bench.py --check-prepare makes them)")
    g.add_argument("--check-part", choices=CHECK_PARTS, default=None, help=argparse.SUPPRESS)  # one part, in-process
    g.add_argument("--check-prepare", action="store_true", help="train the precision check's models on this "
                   "machine (quick.py's classifier and UNet stages, ~20 min on 2 CPU cores) into --check-models")
    g.add_argument("--check-prepare-size", choices=["cpu", "tiny"], default="cpu", help=argparse.SUPPRESS)
    g.add_argument("--check-data-source", default=None, help=argparse.SUPPRESS)  # quick.py's --data (tests)
    g.add_argument("--pack-data", nargs=2, metavar=("SRC", "DEST"), default=None,
                   help="copy an image-folder data set (test.zip + the first --pack-train images of train.zip) to "
                        "DEST, small enough to travel to a lent GPU")
    g.add_argument("--pack-train", type=int, default=25000)
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.check_parts = [s for s in args.check_parts.split(",") if s]
    check_device(args.device)
    if args.pack_data:
        check_positive(args, "pack_train")
        require(all(os.path.isfile(os.path.join(args.pack_data[0], f"{s}.zip")) for s in ("train", "test")),
                f"--pack-data: {args.pack_data[0]} holds no train.zip and test.zip")
        check_out_dir(args.pack_data[1])
        return args
    # the parts run with the repository as their working directory: paths are made absolute first
    args.check_out, args.check_data, args.check_models = map(os.path.abspath, (args.check_out, args.check_data,
                                                                               args.check_models))
    if args.check_prepare:
        check_out_dir(args.check_models)
        return args
    if args.gpu_check or args.check_part:
        require(set(args.check_parts) <= set(CHECK_PARTS), f"--check-parts: choose from {CHECK_PARTS}")
        require(math.isfinite(args.check_budget) and args.check_budget > 0, "--check-budget must be positive")
        check_out_dir(args.check_out)
        return args
    if not set(args.only) <= set(SECTIONS):
        raise UserError(f"--only: unknown section(s) {sorted(set(args.only) - set(SECTIONS))}; choose from {SECTIONS}")
    check_positive(args, "repeats")
    require(not os.path.isdir(args.out), f"--out {args.out} is a directory; bench.py writes one JSON file")
    check_out_dir(os.path.dirname(os.path.abspath(args.out)))
    refuse_overwrite(args.out, args.overwrite, "--overwrite to replace it")
    return args


# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, repeats, number=None, info=None):
    """Median seconds per call of fn() after one warm-up call (compilation, autotuning, allocator; its
    time goes to info['first s'] when info is given, and the peak memory of the timed calls to
    info['peak GiB'] on CUDA). number=None loops short calls so a sample lasts >= 20 ms: one timer pair
    cannot resolve a 50 us kernel. Long calls pass number=1 and skip the extra call that estimates it."""
    def sample(k):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / k

    first = sample(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    number = number or max(1, math.ceil(0.02 / sample(1)))
    s = statistics.median(sample(number) for _ in range(repeats))
    if info is not None:
        info["first s"] = first
        if device.type == "cuda":
            info["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return s


def amp(device, precision):
    """addt_common.autocast after setting the TF32 switches this precision asks for."""
    return autocast(device, resolve_precision(precision, device))


def release(device):
    """Free what a finished row left (compiled graphs, CUDA graph pools, cached blocks) before the next
    row sizes its chunk from the free memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(name, fn, device, deadline=None, need_s=0):
    """Run one row: its dict, or {'path': name, 'error': ...} when it runs out of memory or fails (a row's
    failure never stops the section), or 'skipped' when fewer than need_s seconds are left."""
    left = None if deadline is None else deadline - time.time()
    if left is not None and left < need_s:
        return {"path": name, "skipped": f"not started: {left:.0f} s left, the row needs about {need_s} s"}
    try:
        return {"path": name, **fn()}
    except torch.cuda.OutOfMemoryError as e:
        return {"path": name, "error": "CUDA out of memory: " + str(e).splitlines()[0][:200]}
    except Exception as e:  # noqa: BLE001  (a bench row reports any failure as its result)
        return {"path": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        release(device)


# ---------------------------------------------------------------- 1. UNet forward and input gradient

def count_flops(unet, x, t):
    """FLOPs of a forward and of a forward + input-gradient pass, counted once on one image and scaled
    (both are linear in the batch; precision, layout and compile do not change them). The model and the
    inputs are on the same device; the CPU's SDPA op is not in the counter's table, so there attention
    FLOPs are left out."""
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


def bench_unet(unet, size, device, repeats, compile_cpu, deadline=None):
    n, cuda = size["unet_batch"], device.type == "cuda"
    x, t = torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 1000, (n,), device=device)
    flops_fwd, flops_grad = count_flops(copy.deepcopy(unet).to(device), x, t)  # model and inputs on one device
    rows = []
    for name, precision, channels_last, compile in UNET_SETTINGS:
        if not cuda and (precision == "tf32" or compile and not compile_cpu):
            continue

        def row():
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
            return {"fwd img/s": n / s_fwd, "fwd TFLOP/s": flops_fwd / s_fwd / 1e12,
                    "fwd+grad img/s": n / s_grad, "fwd+grad TFLOP/s": flops_grad / s_grad / 1e12}

        r = guarded(name, row, device, deadline, need_s=60 if compile else 10)
        rows.append({"setting": r.pop("path"), **r})
    return {"batch": n, "gflop_per_image_fwd": flops_fwd / n / 1e9,
            "gflop_per_image_fwd_grad": flops_grad / n / 1e9, "rows": rows}


# ---------------------------------------------------------------- 2. one PGD-EoT step: official-style path

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


def official_gradient(purify, models, classifier, x, y):
    """One EoT draw, official-style: fp32 eager, batch = images, weights requiring grad (.backward() also
    fills every weight's .grad: work the attack never uses), per-call checkpointing."""
    x_d = x.detach().requires_grad_(True)
    F.cross_entropy(classifier(purify(x_d)), y, reduction="sum").backward()
    for m in (*models, classifier):
        m.zero_grad(set_to_none=True)
    return x_d.grad


def official_row(family, model, classifier, size, device, repeats):
    """The official-style path: its pipelines/s counts one draw of `official_images` images per call (its
    EoT draws run one after another, so EoT scales the time linearly)."""
    f = size["families"][family]
    n = f["official_images"]
    net = copy.deepcopy(model).to(device).eval().requires_grad_(True)
    clf = copy.deepcopy(classifier).to(device).eval().requires_grad_(True)
    if family == "ddpm":
        steps = make_schedule("ddpm", int(f["flags"][1])).timesteps
        purify = lambda x: official_purify(net, x, steps)  # noqa: E731
    else:
        args = family_args(family, size, [])
        purifier = build_purifier(args, net)
        purifier.grad_checkpoint = True  # as ADDT's attack scripts
        purify = lambda x: purifier(x, fresh_noise())  # noqa: E731
    x, y = torch.rand(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    if device.type == "cuda":  # the official path is strict fp32; cuDNN's default would run convolutions in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    info = {}
    step_s = seconds(lambda: official_gradient(purify, [net], clf, x, y), device, size["long_repeats"], 1, info)
    with torch.no_grad():
        eval_s = seconds(lambda: clf(purify(x)).argmax(1), device, size["long_repeats"], 1)
    eot = size["eot"]
    batches = math.ceil(PAPER["images"] / n)
    projected = batches * (PAPER["pgd_steps"] * eot * step_s + PAPER["evaluations"] * eval_s)
    return {"precision": "fp32", "chunk": n, "checkpoint": True, "pipelines/s": n / step_s,
            "eval pipelines/s": n / eval_s, "1024-img PGD20 s": projected, **info}


# ---------------------------------------------------------------- 2. one PGD-EoT step: attack.py's paths

def family_args(family, size, flags, device=None):
    """attack.py's parsed flags for a family at this size (what `python attack.py ...` would run)."""
    small_chunk = ["--chunk", str(size["chunk"])] if size.get("chunk") and "--chunk" not in flags else []
    argv = ["--defense", family, *size["families"][family]["flags"], "--eot", str(size["eot"]), *flags, *small_chunk]
    return attack.parse_args(argv + (["--device", str(device)] if device else []))


def attack_row(family, flags, model, classifier, size, device, repeats, eval_time=True):
    """One chunk of PGD-EoT gradients (and of evaluations) through the Defense attack.py builds for these
    flags; projected to the paper's 1024-image PGD20-EoT10 with attack.py's batching for the chunk."""
    args = family_args(family, size, flags, device)
    purifier = build_purifier(args, prepare(args, copy.deepcopy(model), device))
    defense = attack.build_defense(args, purifier, prepare(args, copy.deepcopy(classifier), device), device)
    c, eot = defense.chunk, args.eot
    n = -(-c // eot)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(n, 3, 32, 32, device=device, generator=g).repeat(eot, 1, 1, 1)[:c]
    y = torch.randint(0, 10, (n,), device=device, generator=g).repeat(eot)[:c]
    pipes = [(i, 0, d) for d in range(eot) for i in range(n)][:c]
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    info = {}
    step_s = seconds(lambda: defense.run(x, y, pipes, ATTACK, grad=True, eot=eot), device, size["long_repeats"], 1,
                     info)
    eval_s = None
    if eval_time:
        with torch.no_grad():
            eval_s = seconds(lambda: defense.run(x, y, pipes, EVAL), device, size["long_repeats"], 1)
    batch = max(1, c // eot) if args.chunk_auto else 64  # attack.py's default --batch-size for this chunk
    batches = math.ceil(PAPER["images"] / batch)
    grad_chunks, eval_chunks = math.ceil(batch * eot / c), math.ceil(batch / c)
    projected = batches * (PAPER["pgd_steps"] * grad_chunks * step_s
                           + PAPER["evaluations"] * eval_chunks * (step_s / 3 if eval_s is None else eval_s))
    return {"flags": " ".join(flags), "precision": defense.precision, "channels_last": args.channels_last,
            "compile": args.compile_mode if args.compile else False, "chunk": c, "batch": batch,
            "checkpoint": defense.checkpointing, "pipelines/s": c / step_s,
            "eval pipelines/s": None if eval_s is None else c / eval_s, "1024-img PGD20 s": projected,
            "eval": "measured" if eval_s is not None else "estimated (a third of a gradient)",
            "bytes/pipeline": (defense.chunk_info or defense.checkpoint_info or {}).get("bytes_per_pipeline"), **info}


def family_model(family, size):
    torch.manual_seed(0)
    config = size["families"][family]["model"]
    if family == "ddpm":
        return UNet(config).eval().requires_grad_(False)
    return new_diffusion_model(family, config).eval().requires_grad_(False)


def bench_attack(family, classifier, size, device, repeats, compile_cpu, rows, deadline=None, save=None,
                 base="official"):
    """The rows (name, flags) of one family's PGD-EoT step, with their speed-up over the row `base`;
    `save` is called after each row (partial results survive a timeout)."""
    model = family_model(family, size)
    out = {"family": family, "eot": size["eot"], "flags": size["families"][family]["flags"],
           "model_calls": build_purifier(family_args(family, size, []), None).info["model_calls"], "rows": []}
    chunks = {}
    for name, flags in rows:
        compiled = flags is not None and ("--fast" in flags and "--no-compile" not in flags)
        if compiled and device.type == "cpu" and not compile_cpu:
            out["rows"].append({"path": name, "skipped": "compiled rows run on the CPU with --compile-cpu only"})
            continue
        if flags is not None and "--compile-mode" in flags and device.type == "cpu":
            out["rows"].append({"path": name, "skipped": "needs CUDA"})
            continue
        if flags is not None and any(f.startswith("{") for f in flags):  # a multiple of --fast's chunk
            if "fast" not in chunks:
                out["rows"].append({"path": name, "skipped": "needs the fast row's chunk"})
                continue
            flags = [str(max(1, int(chunks["fast"] * float(f[2:-1])))) if f.startswith("{") else f for f in flags]
        if flags is None:
            fn = lambda: official_row(family, model, classifier, size, device, repeats)  # noqa: E731
        else:
            eval_time = size["eval"] == "all"
            fn = lambda: attack_row(family, flags, model, classifier, size, device, repeats, eval_time)  # noqa: E731
        row = guarded(name, fn, device, deadline, need_s=90 if compiled else 30)
        if "chunk" in row:
            chunks[name] = row["chunk"]
        out["rows"].append(row)
        ratios(out, base)
        if save:
            save()
    return out


def ratios(out, base="official"):
    """Speed-up of every row over the row `base` (the official-style path; the levers: --fast), in
    pipeline-gradients per second; out['speedup'] is --fast's over the official-style path."""
    out["speed-up over"] = base
    base = next((r.get("pipelines/s") for r in out["rows"] if r["path"] == base), None)
    for r in out["rows"]:
        if base and r.get("pipelines/s"):
            r["speed-up"] = r["pipelines/s"] / base
    fast = next((r for r in out["rows"] if r["path"] == "fast" and "speed-up" in r), None)
    out["speedup"] = fast["speed-up"] if fast and out["speed-up over"] == "official" else None


# ---------------------------------------------------------------- 3. one ADDT training step

def addt_row(flags, size, classifier, device, repeats):
    """train_addt.train_step as train_addt.main runs it for these flags (train_addt.step_modules: the
    same compile, layout and precision): CGPO (5 iterations, RBGM), then the update and EMA."""
    n = size["addt_batch"]
    # parse_args wants a classifier path for CE guidance; train_step takes the model, so the path is unused
    args = train_addt.parse_args(["--init", "scratch", "--perturb", "rbgm", "--classifier", "-", "--device",
                                  str(device), *flags])
    torch.manual_seed(0)
    net = UNet(size["unet"]).to(device).train()
    train_addt.set_dropout(net, args.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    ema = train_addt.EMA(net, args.ema_inv_gamma, args.ema_power, args.ema_max_decay)
    model, step_net, clf, amp_, precision = train_addt.step_modules(args, net, copy.deepcopy(classifier), device)
    family = train_addt.DDPM(device)
    g = torch.Generator(device=device).manual_seed(0)
    batch = [(torch.rand(n, 3, 32, 32, device=device) * 2 - 1, torch.randint(0, 10, (n,), device=device))]
    info = {}
    step_s = seconds(lambda: train_addt.train_step(model, step_net, family, clf, ema, opt, batch, args, g, amp_),
                     device, repeats, number=1, info=info)
    epoch_s = EPOCH_IMAGES / (n / step_s)
    return {"flags": " ".join(flags), "precision": precision, "compile": args.compile_mode if args.compile else False,
            "batch": n, "cgpo_iters": args.cgpo_iters, "step s": step_s, "img/s": n / step_s, "epoch s": epoch_s,
            f"{EPOCHS} epochs s": EPOCHS * epoch_s, **info}


def bench_addt(size, classifier, device, repeats, compile_cpu, deadline=None, save=None):
    out = {"batch": size["addt_batch"], "rows": []}
    for name, flags in ADDT_ROWS:
        compiled = "--fast" in flags and "--no-compile" not in flags
        if compiled and device.type == "cpu" and not compile_cpu:
            out["rows"].append({"path": name, "skipped": "compiled rows run on the CPU with --compile-cpu only"})
            continue
        out["rows"].append(guarded(name, lambda: addt_row(flags, size, classifier, device, repeats), device,
                                   deadline, need_s=120 if compiled else 20))
        if save:
            save()
    ok = [r for r in out["rows"] if "epoch s" in r]
    out["epoch s"] = min(r["epoch s"] for r in ok) if ok else None
    return out


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


# ---------------------------------------------------------------- the GPU check

CHECK_PARTS = ["tests", "attack", "addt", "kernels", "unet", "families", "precision", "levers"]
# the tests that exercise CUDA where there is one: kernels, precision, the fast path (its compile tests too)
CHECK_TESTS = ["tests/test_rbgm.py", "tests/test_ddpm_step.py", "tests/test_precision.py", "tests/test_fast.py"]
# the most seconds each part may take (bounded further by what is left of the budget)
CHECK_PART_S = {"tests": 150, "attack": 240, "addt": 150, "kernels": 60, "unet": 90, "families": 240,
                "precision": 180, "levers": 300}
CHECK_MIN_S = 15  # a part is started only with this many seconds left
CHECK_BENCH = {"attack": "attack,memory", "addt": "addt", "kernels": "rbgm,step", "unet": "unet",
               "families": "vpsde,edm", "levers": "levers"}  # part -> bench.py --only
# the precision check: PGD20-EoT10 l_inf on DP_DDPM, fp32 vs bf16 on the same images and seeds
PRECISION = {"gpu": dict(n=256, nfe=10, steps=20, eot=10, chunk=640, batch=64),
             "cpu": dict(n=4, nfe=5, steps=2, eot=2, chunk=8, batch=4)}


def check_commands(args, out):
    """(part, argv, most seconds) of every part asked for, in order of value. Each part runs as its own
    process (a crash, a hang or an out-of-memory stops that part only); the bench parts write their
    JSON after every row, so a part stopped at its time limit keeps the rows it finished."""
    py, me = sys.executable, os.path.join(REPO, "bench.py")
    common = [*(["--device", args.device] if args.device else []), *(["--small"] if args.small else [])]
    cmds = []
    for part in args.check_parts:
        if part == "tests":
            argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECK_TESTS]
        elif part == "precision":
            argv = [py, me, "--check-part", "precision", "--check-out", out, "--check-data", args.check_data,
                    "--check-models", args.check_models, *common]  # attack.py runs: resumed, not cut by rows
        else:
            argv = [py, me, "--size", "small" if args.small else "check", "--only", CHECK_BENCH[part], "--out",
                    os.path.join(out, "parts", f"{part}.json"), "--overwrite", "--deadline", "{deadline}",
                    *(["--device", args.device] if args.device else [])]
        cmds.append((part, argv, CHECK_PART_S[part]))
    return cmds


def run_check(cmds, out, budget, resume=False, min_s=CHECK_MIN_S):
    """Run the parts in order, each in its own process group with a timeout of min(its limit, the time
    left): a part that fails, hangs or runs out of memory is reported and the next one runs. The report
    (OUT/gpu-check.json and .md) is rewritten after every part. Each part's process gets --deadline, the
    time it must be done by, so bench parts stop starting rows in time; its log is OUT/logs/PART.log."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    path = os.path.join(out, "gpu-check.json")
    before = read_json(path, "GPU check report") if resume and os.path.exists(path) else {}
    report = {"budget s": budget, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    cache = os.path.abspath(out) + "-cache"  # compiled kernels shared by the parts (and kept for a rerun)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor")),
           "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", os.path.join(cache, "triton"))}
    t0 = time.time()
    for part, argv, limit in cmds:
        kept = before.get("parts", {}).get(part)
        if kept and kept["status"] == "ok":
            report["parts"][part] = {**kept, "kept": True}
            continue
        left = budget - (time.time() - t0)
        if left < min_s:
            report["parts"][part] = {"status": "skipped", "reason": f"{max(left, 0):.0f} s left of the budget"}
            write_report(out, report)
            continue
        timeout = min(limit, left)
        deadline = time.time() + timeout - 5  # the part stops starting rows 5 s before it would be killed
        log = os.path.join(out, "logs", f"{part}.log")
        print(f"\n=== {part} (at most {timeout:.0f} s)", flush=True)
        start = time.time()
        status, rc = "ok", None
        with open(log, "w") as f:
            proc = subprocess.Popen([str(deadline) if a == "{deadline}" else a for a in argv], cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group: it and its children
                proc.wait()
                status = "timed out"
        entry = {"status": status, "seconds": time.time() - start, "limit s": timeout, "exit": rc, "log": log}
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
        entry.update(part_result(part, out, tail))
        if status != "ok":
            entry["log tail"] = tail[-1500:]
        report["parts"][part] = entry
        print(f"{part}: {status} in {entry['seconds']:.0f} s", flush=True)
        write_report(out, report)
    report["total s"] = time.time() - t0
    write_report(out, report)
    return report


def part_result(part, out, log_tail):
    """What a finished (or stopped) part produced: its JSON, or for the tests pytest's summary line."""
    if part == "tests":
        lines = [line for line in log_tail.splitlines() if " in " in line and any(
            w in line for w in ("passed", "failed", "error", "skipped"))]
        return {"summary": lines[-1].strip("= ") if lines else "no pytest summary (see the log)"}
    path = os.path.join(out, "parts", f"{part}.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {"result": json.load(f)}
    except (OSError, json.JSONDecodeError):
        return {"result": None}


def write_report(out, report):
    machines = [p["result"].get("device") for p in report["parts"].values()
                if isinstance(p.get("result"), dict) and p["result"].get("device")]
    report["machine"] = machines[0] if machines else report.get("machine")
    write_json(os.path.join(out, "gpu-check.json"), report)
    write_text(os.path.join(out, "gpu-check.md"), check_markdown(report))


def fmt_s(v):
    return "-" if v is None else format_seconds(v)


def check_markdown(report):
    """The report: a line per part, then the numbers of the README's GPU table."""
    lines = [f"# GPU check on {report.get('machine') or '?'}", "",
             f"budget {report['budget s']:.0f} s, total {report.get('total s', 0):.0f} s, "
             f"started {report['started']}", "",
             markdown_table([{"part": k, "status": v["status"] + (" (kept)" if v.get("kept") else ""),
                              "seconds": f"{v.get('seconds', 0):.0f}",
                              "note": v.get("summary") or v.get("reason") or ""}
                             for k, v in report["parts"].items()], ["part", "status", "seconds", "note"]), ""]
    for part, v in report["parts"].items():
        r = v.get("result")
        if not isinstance(r, dict):
            continue
        lines.append(f"## {part}")
        for key in ("attack", "vpsde", "edm", "levers"):
            if key in r:
                lines += [f"{key} ({r[key]['family']}, {r[key]['model_calls']} network calls, EoT {r[key]['eot']}; "
                          f"speed-up over {r[key].get('speed-up over', 'official')}):", "",
                          markdown_table([attack_cells(x) for x in r[key]["rows"]], ATTACK_COLUMNS), ""]
        if "addt" in r:
            lines += [markdown_table([addt_cells(x) for x in r["addt"]["rows"]], ADDT_COLUMNS), ""]
        if "rbgm" in r:
            cols = ["shape", "rbgm (reference) ms", "rbgm (kernel) ms", "kernel speedup", "kernel speedup vs sort"]
            lines += ["RBGM (kernel timed on CUDA only):", "",
                      markdown_table([{c: fmt(x).get(c, "") for c in cols} for x in r["rbgm"]], cols), ""]
        if "ddpm_step" in r:
            cols = ["step", "fwd ms", "fwd+bwd ms", "fwd speedup", "fwd+bwd speedup"]
            lines += [f"DDPM step {r['ddpm_step']['shape']}, eps {r['ddpm_step']['eps_dtype']}:", "",
                      markdown_table([{c: fmt(x).get(c, "") for c in cols} for x in r["ddpm_step"]["rows"]], cols), ""]
        if "unet" in r:
            lines += [markdown_table([{k: fmt(x).get(k, "") for k in UNET_COLUMNS} for x in r["unet"]["rows"]],
                                     UNET_COLUMNS), ""]
        if part == "precision":
            lines += [precision_line(r), ""]
    return "\n".join(lines)


ATTACK_COLUMNS = ["path", "pipelines/s", "speed-up", "chunk", "checkpoint", "first s", "peak GiB",
                  "1024-img PGD20", "note"]
ADDT_COLUMNS = ["path", "precision", "compile", "img/s", "epoch s", "first s", "peak GiB", "note"]
UNET_COLUMNS = ["setting", "fwd img/s", "fwd TFLOP/s", "fwd+grad img/s", "fwd+grad TFLOP/s", "error"]


def attack_cells(r):
    c = fmt(r)
    note = r.get("error") or r.get("skipped") or ""
    return {"path": r["path"], "pipelines/s": c.get("pipelines/s", ""),
            "speed-up": f"{r['speed-up']:.1f}x" if r.get("speed-up") else "", "chunk": r.get("chunk", ""),
            "checkpoint": r.get("checkpoint", ""), "first s": c.get("first s", ""), "peak GiB": c.get("peak GiB", ""),
            "1024-img PGD20": fmt_s(r.get("1024-img PGD20 s")) if "1024-img PGD20 s" in r else "", "note": note}


def addt_cells(r):
    c = fmt(r)
    return {**{k: c.get(k, "") for k in ADDT_COLUMNS}, "note": r.get("error") or r.get("skipped") or ""}


def precision_line(r):
    if "fp32" not in r or "bf16" not in r:
        return f"precision check incomplete: {r}"
    return (f"robust accuracy fp32 {r['fp32']['robust_accuracy']:.2f} vs bf16 {r['bf16']['robust_accuracy']:.2f} "
            f"({r['robust_difference_points']:+.2f} points, {r['images_deciding_differently']} of {r['n']} images "
            f"decided differently; models: {r['models']['kind']}); {r['verdict']}")


# ---------------------------------------------------------------- the precision check (a part of the GPU check)

def precision_check(args):
    """Robust accuracy with bf16 vs fp32 on the same images and seeds (PGD20-EoT10 l_inf on DP_DDPM at
    NFE 10, attack.py with an explicit --chunk so the two runs differ in precision only). Models: the
    trained ones in --check-models (bench.py --check-prepare) with --check-data, else the smoke preset's
    (an untrained diffusion model: the check then shows the mechanics, not the answer). Resumable: the
    attack.py runs continue where a stopped check left them."""
    out = args.check_out
    models = {"kind": "prepared", "ddpm": os.path.join(args.check_models, "ddpm"),
              "classifier": os.path.join(args.check_models, "classifier.pt"), "data": args.check_data}
    if not (os.path.isdir(models["ddpm"]) and os.path.isfile(models["classifier"])):
        smoke = attack.make_smoke_inputs(os.path.join(out, "smoke-inputs"))
        models = {"kind": "smoke (untrained diffusion model, synthetic images: mechanics only)", **smoke}
    require(os.path.exists(models["data"]), f"precision check: data {models['data']} not found (bench.py "
                                            "--pack-data makes it; name its folder in the device tool's carry)")
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda") and not args.small
    size = PRECISION["gpu" if cuda else "cpu"]
    res = {"n": size["n"], "settings": size, "models": models}
    for precision in ("fp32", "bf16"):
        run = os.path.join(out, f"precision-{precision}")
        argv = ["--defense", "ddpm", "--nfe", str(size["nfe"]), "--ddpm", models["ddpm"], "--classifier",
                models["classifier"], "--data", models["data"], "--n", str(size["n"]), "--steps", str(size["steps"]),
                "--eot", str(size["eot"]), "--chunk", str(size["chunk"]), "--batch-size", str(size["batch"]),
                "--precision", precision, "--channels-last", "--out", run,
                *(["--device", args.device] if args.device else [])]
        s = attack.main(argv + (["--resume"] if os.path.isdir(run) else []))
        res[precision] = {k: s[k] for k in ("clean_accuracy", "robust_accuracy", "robust_ci", "seconds")}
        write_json(os.path.join(out, "parts", "precision.json"), res)
    recs = [attack.read_records(os.path.join(out, f"precision-{p}")) for p in ("fp32", "bf16")]
    res["images_deciding_differently"] = sum(recs[0][i]["robust"] != recs[1][i]["robust"] for i in recs[0])
    res["robust_difference_points"] = res["bf16"]["robust_accuracy"] - res["fp32"]["robust_accuracy"]
    res["device"] = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})"
    res["verdict"] = ("bf16 within 1 point of fp32" if abs(res["robust_difference_points"]) < 1
                      else "bf16 moves robust accuracy by 1 point or more: keep fp32 the default")
    write_json(os.path.join(out, "parts", "precision.json"), res)
    print(precision_line(res))
    return res


def check_prepare(args):
    """The precision check's models, trained on this machine without network: quick.py's classifier and
    UNet-from-scratch stages (its CPU size: a WRN-16-2 and a small DDPM UNet trained on t <= 0.1 T, about
    20 min on 2 CPU cores, on ../shared/data/cifar10-jpeg), copied to --check-models as classifier.pt and
    ddpm/: a few MiB, so they travel to a lent GPU beside --check-data within the 64 MiB of `carry`.
    Resumable (quick.py's stages are)."""
    import quick
    qargs, size = quick.parse_args(["--out", os.path.join(os.path.dirname(os.path.abspath(args.check_out)),
                                                          "check-models"), "--device", "cpu",
                                    "--size", args.check_prepare_size,
                                    *(["--data", args.check_data_source] if args.check_data_source else [])])
    quick.check_plan(qargs, size)
    (_, clf_dir, kind_c, argv_c, done_c), (_, unet_dir, kind_u, argv_u, done_u) = quick.stage_list(qargs, size)[:2]
    for folder, kind, argv, done in ((clf_dir, kind_c, argv_c, done_c), (unet_dir, kind_u, argv_u, done_u)):
        if not done():
            t0 = time.time()
            quick.run_stage(folder, kind, argv())
            write_json(os.path.join(folder, "quick-done.json"), {"seconds": time.time() - t0, "argv": argv()})
    dest = args.check_models
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(os.path.join(clf_dir, "classifier.pt"), os.path.join(dest, "classifier.pt"))
    shutil.rmtree(os.path.join(dest, "ddpm"), ignore_errors=True)
    shutil.copytree(os.path.join(unet_dir, "ema"), os.path.join(dest, "ddpm"))
    write_json(os.path.join(dest, "models.json"), {"source": "quick.py stages classifier and vanilla",
                                                   "size": args.check_prepare_size, "data": qargs.data,
                                                   "classifier": size["classifier"], "unet": size["unet"]})
    mib = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs) / 2 ** 20
    print(f"precision check models in {dest} ({mib:.1f} MiB)")
    return dest

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



# ---------------------------------------------------------------- main

def fmt(row):
    return {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}


def speedup(section):
    return f"{section['speedup']:.2f}x" if section.get("speedup") else "not measured"


def table(title, rows, columns=None):
    columns = columns or list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    print(f"\n## {title}\n" + markdown_table([{c: fmt(r).get(c, "") for c in columns} for r in rows], columns),
          flush=True)


def gpu_check(args):
    """The GPU check (see check_commands and run_check): one report in --check-out."""
    out = args.check_out
    cmds = check_commands(args, out)
    report = run_check(cmds, out, args.check_budget, args.check_resume)
    print("\n" + check_markdown(report))
    print(f"\n-> {os.path.join(out, 'gpu-check.md')}")
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.pack_data:
        return pack_data(*args.pack_data, args.pack_train)
    if args.check_prepare:
        return check_prepare(args)
    if args.check_part == "precision":
        return precision_check(args)
    if args.gpu_check:
        return gpu_check(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = SMALL if args.small or device.type == "cpu" else SIZES[args.size or "full"]
    small = size is SMALL
    repeats = args.repeats or size["repeats"]
    size = dict(size, long_repeats=min(repeats, size["long_repeats"]) if args.repeats else size["long_repeats"])
    only, deadline = args.only, args.deadline
    # kernels are timed on CUDA only: on the CPU they run in the Triton interpreter, which is no speed
    kernels = rbgm_module.triton is not None and device.type == "cuda"
    torch.manual_seed(0)
    unet = UNet(size["unet"]).eval().requires_grad_(False)
    classifier = build_classifier(size["classifier"], 10).eval().requires_grad_(False)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    res = {"device": name, "torch": torch.__version__, "triton": getattr(rbgm_module.triton, "__version__", None),
           "settings": {**vars(args), "small": small, "size": size["name"], "repeats": repeats, **size}}
    save = lambda: write_json(args.out, res)  # noqa: E731  (after every row: a stopped run keeps what it measured)
    print(f"bench on {name}, torch {res['torch']}, triton {res['triton']}, {size['name']} size")

    if "unet" in only:
        res["unet"] = bench_unet(unet, size, device, repeats, args.compile_cpu, deadline)
        save()
        table(f"1. UNet, batch {size['unet_batch']}, {res['unet']['gflop_per_image_fwd']:.3g} GFLOP/img forward",
              res["unet"]["rows"], UNET_COLUMNS)
    if "attack" in only or "memory" in only:
        res["attack"] = a = bench_attack("ddpm", classifier, size, device, repeats, args.compile_cpu,
                                         size["attack_rows"], deadline, save)
        table(f"2. PGD-EoT step, DDPM: EoT {a['eot']}, {a['model_calls']} UNet calls, one chunk per row",
              [attack_cells(r) for r in a["rows"]], ATTACK_COLUMNS)
        print(f"speed-up of --fast: {speedup(a)} (target >= {TARGETS['attack_speedup']:g}x at full size)")
    if "addt" in only:
        res["addt"] = r = bench_addt(size, classifier, device, repeats, args.compile_cpu, deadline, save)
        table(f"3. ADDT step, batch {r['batch']}, 5 CGPO iterations (target: epoch <= {TARGETS['epoch_s']:g} s at "
              "full size)", [addt_cells(x) for x in r["rows"]], ADDT_COLUMNS)
    if "rbgm" in only:
        res["rbgm"] = bench_rbgm(size["rbgm_shapes"], device, repeats, kernels)
        save()
        # a variant per row and a shape per column: the variants' names do not fit across
        table(f"4. RBGM (kernel target >= {TARGETS['rbgm_speedup']:g}x at 128x3x32x32, never slower)",
              [{"variant": k, **{r["shape"]: r[k] for r in res["rbgm"]}} for k in res["rbgm"][0] if k != "shape"])
    if "step" in only:
        res["ddpm_step"] = s = bench_step(size["step_shape"], device, repeats, kernels)
        save()
        table(f"5. DDPM step {s['shape']}, eps {s['eps_dtype']} (fused target >= {TARGETS['step_speedup']:g}x)",
              s["rows"])
    if "memory" in only:
        peaks = {r["path"]: r["peak GiB"] for r in res["attack"]["rows"] if "peak GiB" in r}
        res["memory"] = peaks or {"skipped": "needs CUDA (torch.cuda.max_memory_allocated)"}
        save()
        table("6. Peak GPU memory of the PGD-EoT step (GiB, one chunk)", [res["memory"]])
    for i, family in enumerate(("vpsde", "edm"), start=7):
        if family in only:
            res[family] = r = bench_attack(family, classifier, size, device, repeats, args.compile_cpu,
                                           size["attack_rows"], deadline, save)
            table(f"{i}. PGD-EoT step, {family}: EoT {r['eot']}, {r['model_calls']} network calls "
                  f"({' '.join(r['flags'])})",
                  [attack_cells(x) for x in r["rows"]], ATTACK_COLUMNS)
            print(f"speed-up of --fast: {speedup(r)}")
    if "levers" in only:
        rows = [("fast", ["--fast"]), ("fast, eager", ["--fast", "--no-compile"])] + LEVER_ROWS
        res["levers"] = r = bench_attack("ddpm", classifier, size, device, repeats, args.compile_cpu, rows,
                                         deadline, save, base="fast")
        table("9. The levers behind --fast, DDPM (each row: python attack.py FLAGS; speed-up over --fast)",
              [{**attack_cells(x), "flags": x.get("flags", "")} for x in r["rows"]], ATTACK_COLUMNS + ["flags"])
    save()
    print(f"\n-> {args.out}")
    return res


if __name__ == "__main__":
    run_main(main)
