"""A quick real-data reproduction of the paper's claims, in one command (a preset, like nanoGPT's
shakespeare_char config): no pretrained weights, CIFAR-10, a table and a figure at the end.

    python quick.py                         # CPU preset: about 45 min on 2 cores (N = 128 test images)
    python quick.py --device cuda           # GPU preset: estimated <= 10 min on one H100 (N = 256)
    python quick.py --plan                  # the stages, their sizes and estimated times; runs nothing
    python quick.py --size tiny --data D    # every stage at a toy size (the test)

Stages, each the project's own script called as a function with an argv list (the command-line code
path), each in its own folder of --out (default runs/quick):
  1. classifier   train_classifier.py: a small WideResNet, a few short epochs
  2. vanilla      train_addt.py --init scratch --perturb none: a small DDPM UNet from random weights
  3. clean-ft     train_addt.py --perturb none from vanilla's EMA (the paper's "clean fine-tuning")
  4. addt         train_addt.py --perturb rbgm (CGPO guided by the classifier), same steps/batch/lr/seed
  5. attacks      attack.py: the bare classifier, then PGD-EoT l_inf 8/255 (step 2/255) on DP_DDPM and
                  DP_DDIM of the three models in the white-box, dw-fwd and dw-both settings
Then OUT/README.md (the table and the claims checked by computation), OUT/results.json (everything,
timings and the machine included) and OUT/settings.png (robust accuracy per setting, like the paper's
figures 2 and 6; needs matplotlib).

Deviations from the paper, forced by the budget (all in SIZES below and written to the README):
small UNet and classifier trained from scratch for minutes; every diffusion stage trains on
t <= t* T only (train_addt.py --t-max: purification never visits t > t*, the paper samples t uniformly
in [0, T)); NFE 5 for both samplers; fewer PGD steps / EoT draws and images than PGD20-EoT10 on 1024;
fine-tuning for minutes (60 steps of 64 on the CPU) instead of 100 epochs. Evaluation on the first N test
images, class-balanced in the image-folder order of addt_data.py.

Resumable: a finished stage is skipped (classifier.pt; ema/ with quick-done.json; summary.json), an
interrupted one is continued with the script's own --resume. A second call with other sizes refuses
to mix them into the same --out.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch

import attack
import train_addt
import train_classifier
from addt_attacks import wilson_interval
from addt_common import UserError, check_out_dir, format_seconds, markdown_table, read_json, run_main, write_json

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg"))


def unet_config(channels, layers, attn_level, groups):
    """A small diffusers UNet2DModel config in the layout of models/unet.py's DDPM_CIFAR10_CONFIG."""
    from models.unet import DDPM_CIFAR10_CONFIG
    down = ["AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(len(channels))]
    up = ["AttnUpBlock2D" if i == attn_level else "UpBlock2D" for i in reversed(range(len(channels)))]
    return {**DDPM_CIFAR10_CONFIG, "block_out_channels": list(channels), "layers_per_block": layers,
            "down_block_types": down, "up_block_types": up, "norm_num_groups": groups}


# Sizes per preset. `rates` are effective GFLOP/s per kind of work, used only for the ETA: cpu measured
# on the 2-core development machine (torch 2.13), cuda ASSUMED for one H100 in fp32 (every script's
# default): nothing was measured on a GPU. `load_s`: reading a split once.
# ema_max_decay: with the warmup decay 1 - (1 + step)^-0.75 the cap 0.999 binds only after ~10k steps, so here
# the EMA averages roughly the last step^0.75 steps; at the end of the CPU vanilla run its test eps-MSE was
# 0.1842 against 0.1812 for the raw weights (a lag of the warmup, not an EMA stuck at the start).
SIZES = {
    "cpu": dict(
        n=128, seed=0,
        classifier=dict(arch="wrn-16-2", epochs=4, steps_per_epoch=160, batch=128),
        unet=dict(channels=[32, 64, 64], layers=1, attn_level=1, groups=8),
        scratch=dict(steps=700, batch=64, lr=1e-3),
        finetune=dict(steps=60, batch=64, lr=2e-4),
        ema_max_decay=0.999, t_star=0.1, nfe=5,
        attack=dict(steps=6, eot=3, batch=64, chunk=64),
        rates=dict(clf_train=170, unet_train=125, addt=125, attack=250, eval=160),
        load_s=dict(train=13, test=4)),
    "cuda": dict(
        n=256, seed=0,
        classifier=dict(arch="wrn-16-4", epochs=8, steps_per_epoch=390, batch=128),
        unet=dict(channels=[48, 96, 96], layers=1, attn_level=1, groups=16),
        scratch=dict(steps=1500, batch=128, lr=1e-3),
        finetune=dict(steps=200, batch=128, lr=2e-4),
        ema_max_decay=0.999, t_star=0.1, nfe=5,
        attack=dict(steps=20, eot=3, batch=256, chunk=256),
        rates=dict(clf_train=30000, unet_train=15000, addt=15000, attack=15000, eval=15000),
        load_s=dict(train=8, test=2)),
    "tiny": dict(
        n=4, seed=0,
        classifier=dict(arch="wrn-10-1", epochs=1, steps_per_epoch=2, batch=16),
        unet=dict(channels=[16, 32], layers=1, attn_level=1, groups=8),
        scratch=dict(steps=2, batch=8, lr=1e-3),
        finetune=dict(steps=1, batch=8, lr=2e-4),
        ema_max_decay=0.999, t_star=0.1, nfe=5,
        attack=dict(steps=1, eot=2, batch=4, chunk=8),
        rates=dict(clf_train=20, unet_train=20, addt=20, attack=20, eval=20),
        load_s=dict(train=0.1, test=0.1)),
}
MODELS = {"vanilla": "vanilla (from scratch)", "clean-ft": "clean fine-tune", "addt": "ADDT fine-tune"}
SAMPLERS = {"ddpm": "DP_DDPM", "ddim": "DP_DDIM"}
SETTINGS = ["white-box", "dw-fwd", "dw-both"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help=f"default {SHARED_DATA} if it exists, else cifar10 (downloaded)")
    p.add_argument("--out", default="runs/quick")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: cuda on a GPU, else cpu")
    p.add_argument("--n", type=int, default=None, help="test images (the first N: class-balanced; default 128 cpu, "
                   "256 cuda)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--plan", action="store_true", help="print the stages and estimated times, run nothing")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.device.split(":")[0] in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda[:K], not {args.device}")
    args.size = args.size or ("cuda" if args.device.startswith("cuda") else "cpu")
    args.data = args.data or (SHARED_DATA if os.path.exists(SHARED_DATA) else "cifar10")
    args.out = os.path.abspath(args.out)  # the scripts' --resume compares paths: keep them cwd-independent
    check_out_dir(args.out)
    size = json.loads(json.dumps(SIZES[args.size]))  # a copy
    size["n"] = size["n"] if args.n is None else args.n
    size["seed"] = size["seed"] if args.seed is None else args.seed
    if size["n"] < 1 or size["seed"] < 0:
        raise UserError(f"--n must be positive and --seed non-negative, not {size['n']} and {size['seed']}")
    return args, size


# ---------------------------------------------------------------- cost model (for the ETA only)

def gflop(model, *inputs):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 1e9


def model_gflops(size):
    """Forward GFLOP per 32x32 image of the UNet and of the classifier."""
    from models import build_classifier
    from models.unet import UNet
    unet = UNet(unet_config(**size["unet"]))
    clf = build_classifier(size["classifier"]["arch"], 10)
    x = torch.zeros(1, 3, 32, 32)
    return gflop(unet, x, torch.zeros(1, dtype=torch.long)), gflop(clf, x)


def estimates(size, u, c):
    """Estimated seconds per stage kind, from forward GFLOPs u (UNet) and c (classifier) per image."""
    r, ld, a, n = size["rates"], size["load_s"], size["attack"], size["n"]
    k = size["classifier"]
    calls = size["nfe"] + 1  # NFE 5 visits t = 100, 80, ..., 0
    cgpo = 5  # train_addt's default CGPO iterations: each a UNet forward + input gradient, classifier too
    clean_step = size["finetune"]["batch"] * 3 * u
    addt_step = size["finetune"]["batch"] * (cgpo * (2 * u + 2 * c) + 3 * u + c)
    attack_pipe, eval_pipe = calls * 4 * u + 3 * c, calls * u + c
    evals = 2 * n * eval_pipe / r["eval"]
    return {
        "classifier": ld["train"] + ld["test"] + k["epochs"] * k["steps_per_epoch"] * k["batch"] * 3 * c
        / r["clf_train"],
        "vanilla": ld["train"] + size["scratch"]["steps"] * size["scratch"]["batch"] * 3 * u / r["unet_train"],
        "clean-ft": ld["train"] + size["finetune"]["steps"] * clean_step / r["unet_train"],
        "addt": ld["train"] + size["finetune"]["steps"] * addt_step / r["addt"],
        "none": ld["test"] + n * a["steps"] * 3 * c / r["attack"],
        "white-box": ld["test"] + evals + n * a["steps"] * a["eot"] * attack_pipe / r["attack"],
        "dw-fwd": ld["test"] + evals + n * a["steps"] * attack_pipe / r["attack"],
        "dw-both": ld["test"] + evals + n * a["steps"] * attack_pipe / r["attack"],
    }


# ---------------------------------------------------------------- the stages

def stage_list(args, size):
    """(name, folder, kind, argv builder, is-finished test) per stage, in order."""
    out, data, seed, dev = args.out, args.data, str(size["seed"]), args.device
    clf_dir = os.path.join(out, "classifier")
    clf = os.path.join(clf_dir, "classifier.pt")
    t_max = str(size["t_star"])
    k = size["classifier"]
    stages = [("classifier", clf_dir, "classifier", lambda: [
        "--arch", k["arch"], "--data", data, "--epochs", str(k["epochs"]), "--max-steps-per-epoch",
        str(k["steps_per_epoch"]), "--global-batch", str(k["batch"]), "--eval-n", str(size["n"]), "--seed", seed,
        "--device", dev, "--out", clf_dir], lambda: os.path.isfile(clf))]

    def diffusion(name, extra, s):
        d = os.path.join(out, name)
        every = max(1, min(100, s["steps"] // 4))
        argv = lambda: extra + [  # noqa: E731
            "--data", data, "--t-max", t_max, "--max-steps", str(s["steps"]), "--global-batch", str(s["batch"]),
            "--lr", str(s["lr"]), "--ema-max-decay", str(size["ema_max_decay"]), "--seed", seed, "--device", dev,
            "--log-every", str(every), "--ckpt-every", str(every), "--out", d]
        def done():
            return os.path.isdir(os.path.join(d, "ema")) and os.path.isfile(os.path.join(d, "quick-done.json"))
        return (name, d, name, argv, done)

    vanilla_ema = os.path.join(out, "vanilla", "ema")
    ft = size["finetune"]
    scratch = ["--init", "scratch", "--perturb", "none", "--ddpm", os.path.join(out, "unet-config")]
    stages += [diffusion("vanilla", scratch, size["scratch"]),
               diffusion("clean-ft", ["--ddpm", vanilla_ema, "--perturb", "none"], ft),
               diffusion("addt", ["--ddpm", vanilla_ema, "--perturb", "rbgm", "--classifier", clf], ft)]

    a = size["attack"]
    common = ["--classifier", clf, "--data", data, "--n", str(size["n"]), "--norm", "linf", "--steps", str(a["steps"]),
              "--batch-size", str(a["batch"]), "--chunk", str(a["chunk"]), "--device", dev, "--seed", seed,
              "--precision", "fp32"]

    def attack_stage(name, d, extra, kind):
        return (name, d, kind, lambda: extra + common + ["--out", d],
                lambda: os.path.isfile(os.path.join(d, "summary.json")))

    stages.append(attack_stage("attack classifier alone", os.path.join(out, "attack", "classifier"),
                               ["--defense", "none"], "none"))
    for model in MODELS:
        for sampler in SAMPLERS:
            for setting in SETTINGS:
                eot = a["eot"] if setting == "white-box" else 1
                stages.append(attack_stage(f"attack {model} {sampler} {setting}",
                                           os.path.join(out, "attack", f"{model}-{sampler}-{setting}"),
                                           ["--defense", sampler, "--ddpm", os.path.join(out, model, "ema"),
                                            "--setting", setting, "--eot", str(eot), "--nfe", str(size["nfe"]),
                                            "--t-star", str(size["t_star"])], setting))
    return stages


TRAINERS = {"classifier": train_classifier.main, "vanilla": train_addt.main, "clean-ft": train_addt.main,
            "addt": train_addt.main}


def run_stage(folder, kind, argv):
    """Call the script's main with argv, adding --resume when an interrupted run left its state there
    (a trainer's ckpt.pt, an attack's args.json). Returns whether it resumed."""
    main = TRAINERS.get(kind, attack.main)
    resume = os.path.isfile(os.path.join(folder, "ckpt.pt" if kind in TRAINERS else "args.json"))
    main(argv + (["--resume"] if resume else []))
    return resume


def check_plan(args, size):
    """One --out holds one preset: refuse a second call with other sizes, data or device type."""
    sizes = {k: v for k, v in size.items() if k not in ("rates", "load_s")}  # those only feed the ETA
    plan = {"size": args.size, "data": args.data, "device_type": args.device.split(":")[0], "sizes": sizes}
    path = os.path.join(args.out, "plan.json")
    if os.path.isfile(path):
        before = read_json(path, "quick.py plan")
        before["sizes"] = {k: v for k, v in before.get("sizes", {}).items() if k not in ("rates", "load_s")}
        if before != json.loads(json.dumps(plan)):
            changed = sorted(k for k in plan if before.get(k) != json.loads(json.dumps(plan[k])))
            raise UserError(f"{args.out} holds a quick.py run with other settings ({', '.join(changed)}); "
                            "use the same flags to continue it, or another --out")
    os.makedirs(args.out, exist_ok=True)
    write_json(path, plan)
    cfg_dir = os.path.join(args.out, "unet-config")
    os.makedirs(cfg_dir, exist_ok=True)
    write_json(os.path.join(cfg_dir, "config.json"), unet_config(**size["unet"]))


# ---------------------------------------------------------------- results

def read_records(folder):
    """{index: correct} of the final evaluation, from attack.py's records (None when unreadable)."""
    try:
        return {i: float(r["robust"]) if "robust" in r else float(r["pred"] == r["label"])
                for i, r in attack.read_records(folder).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def paired_diff(folder_a, folder_b, acc_a, acc_b, n):
    """Difference a - b in points and its standard error (paired over the same images when the records
    can be read, else as two independent proportions)."""
    ra, rb = read_records(folder_a), read_records(folder_b)
    if ra and rb and set(ra) == set(rb):
        d = [ra[i] - rb[i] for i in ra]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
        return 100 * mean, 100 * math.sqrt(var / len(d))
    pa, pb = acc_a / 100, acc_b / 100
    return acc_a - acc_b, 100 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / max(n, 1))


def collect(args, size):
    """Every attack summary: {(model, sampler, setting): summary} and the bare classifier's."""
    res = {}
    for model in MODELS:
        for sampler in SAMPLERS:
            for setting in SETTINGS:
                d = os.path.join(args.out, "attack", f"{model}-{sampler}-{setting}")
                res[model, sampler, setting] = dict(read_json(os.path.join(d, "summary.json"), "attack summary"),
                                                    folder=d)
    bare = read_json(os.path.join(args.out, "attack", "classifier", "summary.json"), "attack summary")
    return res, bare


def claims(res, n):
    """The paper's claims, checked by computation on the numbers of this run (statements, not opinions)."""
    lines = []

    def cmp(a, b):
        (ra, rb) = res[a], res[b]
        diff, se = paired_diff(ra["folder"], rb["folder"], ra["robust_accuracy"], rb["robust_accuracy"], n)
        return ra["robust_accuracy"], rb["robust_accuracy"], diff, se

    for model, label in MODELS.items():
        clean = res[model, "ddpm", "white-box"]["clean_accuracy"]
        wb, db, diff, se = cmp((model, "ddpm", "white-box"), (model, "ddpm", "dw-both"))
        ok = db <= wb / 2 and diff > 2 * se
        lines.append(f"claim (i) DP_DDPM, {label}: clean {clean:.1f} %, white-box {wb:.1f} %, dw-both {db:.1f} % "
                     f"(drop {diff:.1f} +- {se:.1f} points) -> {'shows' if ok else 'does not show'} (dw-both "
                     "removes at least half of the robustness white-box EoT leaves, by more than 2 standard errors)")
        clean = res[model, "ddim", "white-box"]["clean_accuracy"]
        wb, fw, diff, se = cmp((model, "ddim", "white-box"), (model, "ddim", "dw-fwd"))
        ok = fw <= wb / 2 and diff > 2 * se
        lines.append(f"claim (i) DP_DDIM, {label}: clean {clean:.1f} %, white-box {wb:.1f} %, dw-fwd {fw:.1f} % "
                     f"(drop {diff:.1f} +- {se:.1f} points) -> {'shows' if ok else 'does not show'} (dw-fwd removes "
                     "at least half of DDIM's robustness, by more than 2 standard errors)")
        wb, fw, diff, se = cmp((model, "ddpm", "white-box"), (model, "ddpm", "dw-fwd"))
        lines.append(f"claim (i) DP_DDPM, {label}: white-box {wb:.1f} %, dw-fwd {fw:.1f} % -> "
                     f"{'shows' if fw > wb / 2 else 'does not show'} (dw-fwd leaves DDPM more than half of its "
                     "white-box robustness)")
    for sampler, label in SAMPLERS.items():
        for setting in SETTINGS:
            ad, cl, diff, se = cmp(("addt", sampler, setting), ("clean-ft", sampler, setting))
            verdict = ("shows" if diff > 2 * se else "same direction, within 2 standard errors" if diff > 0
                       else "does not show")
            van = res["vanilla", sampler, setting]["robust_accuracy"]
            lines.append(f"claim (ii) {label} {setting}: ADDT {ad:.1f} %, clean fine-tune {cl:.1f} % "
                         f"(vanilla {van:.1f} %), difference {diff:+.1f} +- {se:.1f} points -> {verdict}")
    return lines


def table_rows(res, bare, size):
    a = size["attack"]
    rows = [{"model": "classifier alone", "sampler": "-", "setting": "white-box", "attack": f"PGD{a['steps']}",
             "N": bare["n"], "clean": f"{bare['clean_accuracy']:.1f}", "robust": f"{bare['robust_accuracy']:.1f}"}]
    for (model, sampler, setting), s in res.items():
        eot = a["eot"] if setting == "white-box" else 1
        rows.append({"model": MODELS[model], "sampler": f"{SAMPLERS[sampler]} NFE {size['nfe']}", "setting": setting,
                     "attack": f"PGD{a['steps']}-EoT{eot}", "N": s["n"], "clean": f"{s['clean_accuracy']:.1f}",
                     "robust": f"{s['robust_accuracy']:.1f}"})
    return rows


def purified_clean(res):
    """Classifier accuracy on purified clean images: the three settings' clean evaluations pooled (3N draws)."""
    out = {}
    for model in MODELS:
        for sampler in SAMPLERS:
            ss = [res[model, sampler, s] for s in SETTINGS]
            k, n = sum(s["clean_accuracy"] * s["n"] / 100 for s in ss), sum(s["n"] for s in ss)
            out[f"{model}/{sampler}"] = {"accuracy": 100 * k / n, "ci95": wilson_interval(k, n), "draws": n}
    return out


def figure(path, res, bare):
    """Grouped bars: robust accuracy per setting, vanilla / clean-FT / ADDT, one panel per sampler."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "figure skipped: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.26
    for ax, (sampler, label) in zip(axes, SAMPLERS.items()):
        for j, (model, mlabel) in enumerate(MODELS.items()):
            accs = [res[model, sampler, s]["robust_accuracy"] for s in SETTINGS]
            ns = [res[model, sampler, s]["n"] for s in SETTINGS]
            ci = [wilson_interval(a * n / 100, n) for a, n in zip(accs, ns)]
            err = [[a - lo for a, (lo, _) in zip(accs, ci)], [hi - a for a, (_, hi) in zip(accs, ci)]]
            xs = [i + (j - 1) * width for i in range(len(SETTINGS))]
            ax.bar(xs, accs, width, yerr=err, capsize=2, label=mlabel)
        ax.axhline(bare["robust_accuracy"], color="k", ls=":", lw=1, label="classifier alone")
        ax.set_xticks(range(len(SETTINGS)), SETTINGS)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("robust accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return f"figure: {path}"


def machine(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe(m):
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads)"
    return f"{where}, torch {m['torch']}, Python {m['python']}, {m['platform']}"


def report(args, argv, size, timings, total_s, est):
    res, bare = collect(args, size)
    n = size["n"]
    rows = table_rows(res, bare, size)
    table = markdown_table(rows, list(rows[0]))
    pure = purified_clean(res)
    statements = claims(res, n)
    clf = read_json(os.path.join(args.out, "classifier", "results.json"), "classifier results")
    note = figure(os.path.join(args.out, "settings.png"), res, bare)
    a, k, u = size["attack"], size["classifier"], size["unet"]
    time_rows = [{"stage": s, "status": t["status"], "seconds": f"{t['seconds']:.0f}",
                  "estimate": f"{t['estimate_s']:.0f}"} for s, t in timings.items()]
    stage_total = sum(t["seconds"] for t in timings.values())
    pure_rows = [{"model / sampler": key, "purified clean accuracy": f"{v['accuracy']:.1f}",
                  "95 % CI": f"[{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}]", "draws": v["draws"]}
                 for key, v in pure.items()]
    md = [f"# Quick reproduction ({args.size} size) of the ADDT paper's claims on real data", "",
          f"`python quick.py{''.join(' ' + x for x in argv)}`", "",
          f"Data {args.data}, the first {n} test images (class-balanced). Machine: {describe(machine(args.device))}.",
          "",
          "## Setup and deviations from the paper", "",
          f"- classifier: {k['arch']}, {k['epochs']} epochs of {k['steps_per_epoch']} steps of {k['batch']} "
          f"(train_classifier.py); test accuracy on the {n} images {100 * clf['test_acc']:.1f} % "
          "(the paper: WRN-28-10, 200 epochs, 95.12 %)",
          f"- UNet from scratch: block_out_channels {u['channels']}, {u['layers']} res block per level, attention at "
          f"level {u['attn_level']}, GroupNorm {u['groups']} (the paper: 35.7 M parameters, pretrained); "
          f"{size['scratch']['steps']} steps of {size['scratch']['batch']}, lr {size['scratch']['lr']}",
          f"- fine-tunes (clean and ADDT, the same budget): {size['finetune']['steps']} steps of "
          f"{size['finetune']['batch']}, lr {size['finetune']['lr']} from the vanilla EMA (the paper: 100 epochs "
          "of 256); ADDT = RBGM + CGPO (5 iterations) guided by the classifier above",
          f"- every diffusion stage trains on t <= {size['t_star']} T only (`--t-max {size['t_star']}`; the paper "
          "samples t uniformly in [0, T)); EMA with warmup, max decay "
          f"{size['ema_max_decay']} (the warmup keeps the decay below it for runs under ~10k steps)",
          f"- purification: t* = {size['t_star']}, NFE {size['nfe']} (t = 100, 80, ..., 0) for DP_DDPM and DP_DDIM; "
          f"attack: PGD{a['steps']} (white-box EoT{a['eot']}, dw settings EoT1), l_inf 8/255, step 2/255, fp32 "
          "(the paper: PGD20-EoT10, N = 1024); robust accuracy = one fresh purification of the final example", "",
          "## Results (accuracy in %)", "", table, "",
          "Classifier accuracy on purified clean images (the clean column pooled over the three settings):", "",
          markdown_table(pure_rows, list(pure_rows[0])), "",
          "## The paper's claims, computed from the table (+- one standard error, paired over the same images)", ""]
    md += [f"- {s}" for s in statements]
    md += ["", "## Time per stage (seconds; 'skipped' = finished by an earlier call)", "",
           markdown_table(time_rows, list(time_rows[0])), "",
           f"Stages {format_seconds(stage_total)} (this call {format_seconds(total_s)}).", "",
           "![robust accuracy per setting](settings.png)" if note.startswith("figure:") else note, ""]
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("\n".join(md))
    write_json(os.path.join(args.out, "results.json"), {
        "size": args.size, "sizes": size, "data": args.data, "out": args.out, "machine": machine(args.device),
        "classifier": {k_: clf[k_] for k_ in ("arch", "test_acc", "eval_n", "epochs", "images_per_s") if k_ in clf},
        "classifier_alone": bare, "attacks": {"/".join(key): s for key, s in res.items()},
        "purified_clean": pure, "claims": statements, "timings": timings, "stage_seconds": stage_total,
        "estimates_s": est, "figure": note})
    print("\n" + table + "\n")
    print("\n".join(statements))
    print(note)
    print(f"-> {os.path.join(args.out, 'README.md')}, results.json")


# ---------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, size = parse_args(argv)
    est_kind = estimates(size, *model_gflops(size))
    stages = stage_list(args, size)
    est = {name: est_kind[kind] for name, _, kind, _, _ in stages}
    if args.plan:
        print(f"quick.py --size {args.size} on {args.device}: {len(stages)} stages, N = {size['n']}")
        for name, folder, kind, argv_fn, done in stages:
            print(f"  {name:40s} ~{format_seconds(est[name])}{'  (finished)' if done() else ''}")
        print(f"  total ~{format_seconds(sum(est.values()))} (rates assumed: {size['rates']} GFLOP/s)")
        return est
    check_plan(args, size)
    t_start, timings = time.time(), {}
    spent, spent_est = 0.0, 0.0  # this call: actual vs estimated seconds of the stages run, to scale the ETA
    for k, (name, folder, kind, argv_fn, done) in enumerate(stages, 1):
        marker = os.path.join(folder, "quick-done.json")
        if done():
            before = read_json(marker, "stage marker") if os.path.isfile(marker) else {}
            timings[name] = {"status": "skipped", "seconds": before.get("seconds", 0.0), "estimate_s": est[name]}
            continue
        # the estimates of what is left, scaled by how this call's finished stages compared with theirs
        remaining = sum(est[s[0]] for s in stages[k - 1:] if not s[4]()) * (spent / spent_est if spent_est else 1)
        print(f"\n[quick] stage {k}/{len(stages)} {name}  elapsed {format_seconds(time.time() - t_start)}  "
              f"remaining ~{format_seconds(remaining)}", flush=True)
        t0 = time.time()
        resumed = run_stage(folder, kind, argv_fn())
        seconds = time.time() - t0
        spent, spent_est = spent + seconds, spent_est + est[name]
        write_json(marker, {"seconds": seconds, "resumed": resumed, "argv": argv_fn()})
        timings[name] = {"status": "resumed" if resumed else "ran", "seconds": seconds, "estimate_s": est[name]}
        print(f"[quick] stage {k}/{len(stages)} {name} done in {format_seconds(seconds)} "
              f"(estimate {format_seconds(est[name])})", flush=True)
    total = time.time() - t_start
    report(args, argv, size, timings, total, est)
    print(f"[quick] finished in {format_seconds(total)}")
    return timings


if __name__ == "__main__":
    run_main(main)
