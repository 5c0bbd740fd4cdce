"""Clean accuracy of diffusion-based purification (DP_DDPM, DP_DDIM, DiffPure's VP-SDE, ADDT's EDM, GDMP) on
the first N test images.

    python purify.py --ddpm DIR --classifier CKPT --data PATH [--defense ddpm|ddim] [--nfe 100] \\
        [--t-star 0.1] [--n 1024]
    python purify.py --defense vpsde --vpsde checkpoint_8.pth --classifier CKPT --data PATH
    python purify.py --defense edm --edm edm-cifar10-32x32-uncond-vp.pkl --classifier CKPT --data PATH
    python purify.py --defense gdmp --guidance mse --ddpm DIR --classifier CKPT --data PATH   # GDMP
    torchrun --nproc_per_node=4 purify.py ...      # shards the images, same totals as one process
    python purify.py --fast ...                    # bf16 autocast on CUDA, channels_last, torch.compile

Writes OUT/results.json (every setting, seed, the purifier's schedule, classifier-only and purified
accuracy with Wilson 95 % intervals, the classifier's input normalisation), OUT/grid.png (rows:
original, diffused to t*, purified) and prints a markdown table. Noise is keyed per image (seed, image
index), so the result does not depend on batch size or the number of processes. An existing
results.json is kept unless --overwrite.
"""
import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from addt_common import (Dist, Progress, UserError, atomic_write_bytes, autocast, check_out_dir, check_positive,
                         lock_out, markdown_table, refuse_overwrite, resolve_precision, run_main, sample_seed,
                         unlock_out, write_json)
from addt_attacks import NonFiniteError, check_finite, wilson_interval
from addt_data import shard, to_float
from addt_diffusion import (KeyedNoise, add_purification_args, build_purifier, check_purification_args, load_inputs,
                            speed_settings)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_purification_args(p)
    p.set_defaults(defense=None)  # default ddpm, below: --sampler must not contradict a given --defense
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="same as --defense (older name)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--grid", type=int, default=8, help="images in grid.png (0 = none)")
    p.add_argument("--out", default="runs/purify")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier results.json in --out")
    args = p.parse_args(argv)
    if args.sampler and args.defense and args.sampler != args.defense:
        raise UserError(f"--sampler {args.sampler} contradicts --defense {args.defense} (--sampler is its older "
                        "name): pass one of them")
    args.defense = args.sampler or args.defense or "ddpm"
    check_purification_args(args)
    check_positive(args, "batch_size")
    if args.grid < 0:
        raise UserError(f"--grid must be 0 (no grid) or positive, not {args.grid}")
    check_out_dir(args.out)
    return args


def image_noise(args, idx, device):
    """The noise of images idx, keyed by (seed, image index) only."""
    return KeyedNoise(torch.tensor([sample_seed(args.seed, i) for i in idx], device=device))


def save_grid(path, rows):
    """rows: list of (n, 3, H, W) tensors in [0, 1] -> one PNG, a row each."""
    grid = torch.cat([torch.cat(list(r.clamp(0, 1).cpu()), dim=2) for r in rows], dim=1)
    image = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    atomic_write_bytes(path, lambda tmp: image.save(tmp, format="PNG"))


def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    d.agree(lambda: (refuse_overwrite(os.path.join(args.out, "results.json"), args.overwrite, "--overwrite to replace "
                                      "it"), lock_out(args.out)))
    model, classifier, images, labels = load_inputs(args, d.device)
    purifier = build_purifier(args, model)
    precision = resolve_precision(args.precision, d.device)
    speed = speed_settings(args, precision)
    if d.master:
        print(f"speed: {speed}", flush=True)
    start, stop = shard(len(labels), d.rank, d.world)
    correct = torch.zeros(2, dtype=torch.long, device=d.device)  # classifier only, purified
    progress = Progress(stop - start, "purify", "img", enabled=d.master)
    t0 = time.time()
    with torch.no_grad(), autocast(d.device, precision):
        for lo in range(start, stop, args.batch_size):
            idx = range(lo, min(lo + args.batch_size, stop))
            x = to_float(images[lo:idx.stop].to(d.device))
            y = labels[lo:idx.stop].to(d.device)
            x_pur = purifier(x, image_noise(args, idx, d.device)).float()
            logits = torch.stack([classifier(x).float(), classifier(x_pur).float()])
            try:
                check_finite(x_pur, list(idx), "purified images")
                check_finite(logits.transpose(0, 1), list(idx), "logits")
            except NonFiniteError as e:
                raise UserError(str(e)) from None
            correct += (logits.argmax(-1) == y).sum(1)
            progress.update(len(idx))
    d.all_sum(correct)
    seconds = time.time() - t0
    if not d.master:
        return
    n = len(labels)
    results = {"args": vars(args), "precision": precision, "speed": speed, "purifier": purifier.info, "n": n,
               "classifier_norm": getattr(classifier, "norm_info", None),
               "classifier_accuracy": 100 * correct[0].item() / n, "purified_accuracy": 100 * correct[1].item() / n,
               "classifier_accuracy_ci95": list(wilson_interval(correct[0].item(), n)),
               "purified_accuracy_ci95": list(wilson_interval(correct[1].item(), n)),
               "seconds": seconds, "images_per_s": n / seconds}
    results["timesteps"] = purifier.info.get("timesteps")  # ddpm/ddim: the reverse timesteps visited
    write_json(os.path.join(args.out, "results.json"), results)
    if args.grid:
        k = min(args.grid, n)
        x = to_float(images[:k].to(d.device))
        trace = []
        with torch.no_grad(), autocast(d.device, precision):
            x_pur = purifier(x, image_noise(args, range(k), d.device), trace=trace).float()
        save_grid(os.path.join(args.out, "grid.png"), [x, (trace[0].float() + 1) / 2, x_pur])
    lo_c, hi_c = results["purified_accuracy_ci95"]
    defense = args.defense + ("+langevin" if args.corrector == "langevin" else "")  # vpsde's extra corrector
    row = {"defense": defense, "model calls": purifier.info["model_calls"], "N": n,
           "classifier": f"{results['classifier_accuracy']:.2f}",
           "purified (clean)": f"{results['purified_accuracy']:.2f} [{lo_c:.1f}, {hi_c:.1f}]"}
    print(markdown_table([row], list(row)))
    print(f"{purifier.info['model_calls']} model calls per image  {results['images_per_s']:.1f} img/s  -> {args.out}")
    unlock_out(args.out)
    return results


if __name__ == "__main__":
    run_main(main)
