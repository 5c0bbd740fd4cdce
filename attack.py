"""PGD-EoT with exact gradients against diffusion-based purification (SPEC.md, "Attack and evaluation").

    python attack.py --preset smoke          # whole pipeline on tiny built-in models, < 2 min on CPU
    python attack.py --setting white-box --norm linf --defense ddpm --ddpm DIR --classifier CKPT \
        --data PATH                           # the paper's PGD20-EoT10 on DP_DDPM (NFE 100)
    torchrun --nproc_per_node=4 attack.py ... # shards the images; identical per-image records

Settings (the attacker's knowledge of the defence's randomness):
  white-box  every purification draws fresh noise (EoT over --eot draws per PGD step)
  dw-fwd     the forward noise is fixed per image and shared with the final evaluation (EoT 1)
  dw-both    forward and every reverse-step noise fixed and shared: a deterministic defence (EoT 1)
  dw-semi    the randomness is one of --semi-n fixed noise sets per image; the attack averages over
             the sets (EoT --semi-n, cycling through them), the evaluation draws one of them

Every random draw is keyed by (seed, image index, stage, PGD step, EoT draw), so records do not depend
on batch size, process count or where a run was resumed. Outputs in --out: records.jsonl (one line
per image), summary.json, summary.md.
"""
import argparse
import glob
import json
import os
import time

import torch
import torch.nn.functional as F

from addt_attacks import SETTINGS, Defense, NonFiniteError, pgd_eot
from addt_common import (Dist, Progress, UserError, markdown_table, refuse_overwrite, resolve_precision, run_main,
                         write_json)
from addt_data import shard, to_float
from addt_diffusion import DEFENSES, add_purification_args, build_purifier, check_purification_args, load_inputs

BUDGETS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1)}  # (eps, step size) on [0, 1] images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=SETTINGS, default="white-box")
    p.add_argument("--semi-n", type=int, default=128, help="noise sets of dw-semi")
    p.add_argument("--norm", choices=list(BUDGETS), default="linf")
    p.add_argument("--eps", type=float, default=None, help="budget (default 8/255 linf, 0.5 l2)")
    p.add_argument("--step-size", type=float, default=None, help="PGD step (default 2/255 linf, 0.1 l2)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--eot", type=int, default=None,
                   help="EoT draws per PGD step (default 10 white-box, 1 dw-fwd/dw-both, semi-n dw-semi)")
    p.add_argument("--eval-draws", type=int, default=1,
                   help="also report robust accuracy averaged over K fresh purifications (1 = paper)")
    add_purification_args(p, DEFENSES + ["none"])
    p.add_argument("--batch-size", type=int, default=64, help="images attacked together")
    p.add_argument("--chunk", type=int, default=64,
                   help="pipelines (image x EoT draw) per forward/backward; results depend on it, not on --batch-size")
    p.add_argument("--out", default="runs/attack")
    p.add_argument("--resume", action="store_true", help="skip images already in OUT/records-*.jsonl")
    p.add_argument("--preset", choices=["smoke"], default=None)
    args = p.parse_args(argv)
    return args if args.preset else check_args(args)


def check_args(args):
    """Fill the setting-dependent defaults and refuse impossible combinations."""
    eps, step = BUDGETS[args.norm]
    args.eps = eps if args.eps is None else args.eps
    args.step_size = step if args.step_size is None else args.step_size
    check_purification_args(args)
    default_eot = {"white-box": 10, "dw-fwd": 1, "dw-both": 1, "dw-semi": args.semi_n}[args.setting]
    if args.defense == "none":
        if args.eot not in (None, 1) or args.setting != "white-box":
            raise UserError("--defense none attacks the bare classifier: it has no randomness, so "
                            "--setting and --eot do not apply (leave them at their defaults)")
        default_eot = 1
    args.eot = default_eot if args.eot is None else args.eot
    if args.setting == "dw-both" and args.eot != 1:
        raise UserError("dw-both fixes every noise, so all EoT draws are the same: drop --eot")
    if args.setting == "dw-semi" and args.semi_n < 1:
        raise UserError("--semi-n must be at least 1")
    if min(args.eot, args.eval_draws, args.steps + 1, args.batch_size, args.chunk, args.n) < 1:
        raise UserError("--eot, --eval-draws, --batch-size, --chunk and --n must be positive")
    return args


# ---------------------------------------------------------------- records, resume, summary

def read_records(out):
    records = {}
    for path in sorted(glob.glob(os.path.join(out, "records-*.jsonl"))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption: redone on resume
                        continue
                    records[r["index"]] = r
    return records


def append_records(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


RUN_ONLY_FLAGS = {"out", "resume", "batch_size", "device", "compile", "channels_last", "preset"}


def check_same_attack(args):
    """--resume must continue the same attack: records made under other flags would be mixed in."""
    path = os.path.join(args.out, "args.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS and k in before
                         and before[k] != (list(v) if isinstance(v, tuple) else v))
        if changed:
            raise UserError(f"--resume with other settings than the records in {args.out} were made with "
                            f"({', '.join(changed)}); use those settings or another --out")


def summarize(args, purifier, records, attacked, seconds, precision):
    """Accuracies over all records; speed over the images attacked in this run."""
    n = len(records)
    rs = [records[i] for i in sorted(records)]
    info = purifier.info if purifier else {}
    summary = {"args": vars(args), "precision": precision, "n": n, "purifier": info,
               "timesteps": info.get("timesteps", []), "model_calls": info.get("model_calls", 0),
               "clean_accuracy": 100 * sum(r["clean_pred"] == r["label"] for r in rs) / n,
               "robust_accuracy": 100 * sum(r["pred"] == r["label"] for r in rs) / n,
               "attacked_this_run": attacked, "seconds": seconds,
               "images_per_s": attacked / max(seconds, 1e-9)}
    if args.eval_draws > 1:
        summary["clean_accuracy_avg"] = 100 * sum(r["clean_correct_frac"] for r in rs) / n
        summary["robust_accuracy_avg"] = 100 * sum(r["robust_correct_frac"] for r in rs) / n
    return summary


def summary_row(s):
    a = s["args"]
    row = {"defense": a["defense"], "NFE": a["nfe"] if a["defense"] != "none" else "-",
           "setting": a["setting"] + (f"-{a['semi_n']}" if a["setting"] == "dw-semi" else ""),
           "attack": f"PGD{a['steps']}-EoT{a['eot']} {a['norm']}", "N": s["n"],
           "clean": f"{s['clean_accuracy']:.2f}", "robust": f"{s['robust_accuracy']:.2f}"}
    if "robust_accuracy_avg" in s:
        row[f"robust (avg of {a['eval_draws']})"] = f"{s['robust_accuracy_avg']:.2f}"
    return row


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.preset == "smoke":
        return smoke(args)
    d = Dist(args.device)
    refuse_overwrite(os.path.join(args.out, "args.json"), args.resume)
    if args.resume:
        check_same_attack(args)
    defended = args.defense != "none"
    model, classifier, images, labels = load_inputs(args, d.device, defended=defended)
    purifier = build_purifier(args, model) if defended else None
    precision = resolve_precision(args.precision, d.device)
    defense = Defense(purifier, classifier, args.setting, args.seed, args.semi_n, args.chunk, precision)
    os.makedirs(args.out, exist_ok=True)
    d.barrier()
    done = read_records(args.out) if args.resume else {}
    start, stop = shard(args.n, d.rank, d.world)
    todo = [i for i in range(start, stop) if i not in done]
    if d.master:
        write_json(os.path.join(args.out, "args.json"), vars(args))
        print(f"attack: {args.setting} {args.norm} on {args.defense}, {args.n} images "
              f"({len(done)} already recorded), {d.world} process(es)", flush=True)
    path = os.path.join(args.out, f"records-{d.rank}.jsonl")
    progress = Progress(len(todo) * args.steps, "pgd", "img-steps", enabled=d.master)
    t0 = time.time()
    for lo in range(0, len(todo), args.batch_size):
        idx = todo[lo:lo + args.batch_size]
        x = to_float(images[idx].to(d.device))
        y = labels[idx].to(d.device)
        try:
            _, records = pgd_eot(defense, x, y, idx, args.eps, args.step_size, args.steps, args.eot, args.norm,
                                 args.eval_draws, on_step=lambda: progress.update(len(idx)))
        except NonFiniteError as e:
            raise UserError(str(e)) from None
        append_records(path, records)
    attacked = int(d.all_sum(torch.tensor(len(todo), device=d.device)))
    if not d.master:
        return
    records = read_records(args.out)
    missing = [i for i in range(args.n) if i not in records]
    if missing:
        raise UserError(f"{len(missing)} images have no record (first: {missing[0]}); rerun with --resume")
    summary = summarize(args, purifier, {i: records[i] for i in range(args.n)}, attacked, time.time() - t0, precision)
    write_json(os.path.join(args.out, "summary.json"), summary)
    table = markdown_table([summary_row(summary)], list(summary_row(summary)))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"{summary['images_per_s']:.3f} img/s  -> {args.out}")
    return summary


# ---------------------------------------------------------------- smoke preset: tiny built-in models

TINY_UNET_CONFIG = dict(sample_size=32, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                        up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)


def synthetic_images(n_per_class, n_classes=10, size=32, seed=0):
    """Images whose class is a colour plus smooth noise: learnable in seconds."""
    # class colours close together (about 0.1 apart), so an 8/255 attack can flip the bare classifier
    palette = 0.45 + 0.1 * torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * n_classes
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    noise = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size, mode="bilinear")
    x = palette[labels] + 0.1 * (noise - 0.5)
    return (x * 255).round().to(torch.uint8), labels


def make_smoke_inputs(root, n_per_class=20, train_steps=60, seed=0):
    """A zip of generated images (image-folder layout), a tiny classifier trained on them for a few
    seconds and an untrained tiny UNet in the diffusers layout. Returns their paths."""
    import zipfile
    from io import BytesIO

    import numpy as np
    from PIL import Image

    from models import build_classifier, classifier_checkpoint
    from models.unet import UNet
    from addt_common import atomic_save
    paths = {"data": os.path.join(root, "images.zip"), "classifier": os.path.join(root, "classifier.pt"),
             "ddpm": os.path.join(root, "unet")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(seed)
    splits = {"train": synthetic_images(n_per_class, seed=seed), "test": synthetic_images(n_per_class, seed=seed + 1)}
    with zipfile.ZipFile(paths["data"] + ".tmp", "w") as z:
        for split, (x, y) in splits.items():
            for k in range(len(y)):
                buf = BytesIO()
                Image.fromarray(x[k].permute(1, 2, 0).numpy().astype(np.uint8)).save(buf, format="PNG")
                z.writestr(f"{split}/class{int(y[k])}/{k:04d}.png", buf.getvalue())
    os.replace(paths["data"] + ".tmp", paths["data"])
    clf = build_classifier("wrn-10-1", 10)
    opt = torch.optim.SGD(clf.parameters(), lr=0.05, momentum=0.9)
    x, y = to_float(splits["train"][0]), splits["train"][1]
    for _ in range(train_steps):
        i = torch.randint(0, len(y), (32,))
        loss = F.cross_entropy(clf(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    atomic_save(classifier_checkpoint(clf.eval(), "wrn-10-1"), paths["classifier"])
    UNet(TINY_UNET_CONFIG).save_pretrained(paths["ddpm"])
    return paths


def smoke(args):
    """Every setting and both norms end to end on the tiny models, in a few seconds each."""
    inputs = make_smoke_inputs(os.path.join(args.out, "smoke-inputs"))
    rows = []
    t0 = time.time()
    runs = [("none", "white-box", "linf")] + [("ddpm", s, nm) for s in SETTINGS for nm in BUDGETS]
    for defense, setting, norm in runs:
        out = os.path.join(args.out, f"smoke-{defense}-{setting}-{norm}")
        argv = ["--defense", defense, "--setting", setting, "--norm", norm, "--out", out, "--n", "8",
                "--batch-size", "4", "--chunk", "8", "--steps", "3", "--semi-n", "3", "--device", "cpu",
                "--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"]]
        if defense != "none":
            argv += ["--nfe", "5"] + (["--eot", "2"] if setting == "white-box" else [])
        if os.path.isdir(out):
            argv.append("--resume")
        rows.append(summary_row(main(argv)))
    print("\nsmoke test (tiny untrained UNet, generated images; checks the install, not the paper):")
    print(markdown_table(rows, list(rows[0])))
    print(f"smoke preset finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main)
