"""Clean accuracy of diffusion-based purification (DP_DDPM / DP_DDIM) on the first N test images.

    python purify.py --ddpm DIR --classifier CKPT --data PATH [--sampler ddpm|ddim] [--nfe 100] \
        [--t-star 0.1] [--n 1024]
    torchrun --nproc_per_node=4 purify.py ...      # shards the images, same totals as one process

Writes OUT/results.json (every setting, seed, timestep list, classifier-only and purified accuracy),
OUT/grid.png (rows: original, diffused to t*, purified) and prints a markdown table.
Noise is keyed per image (seed, image index), so the result does not depend on batch size or the
number of processes.
"""
import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from addt_common import Dist, Progress, autocast, markdown_table, resolve_precision, run_main, sample_seed, write_json
from addt_data import shard, to_float
from addt_diffusion import DEFAULT_NFE, KeyedNoise, add_purification_args, ddpm_purifier, load_inputs, make_schedule



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_purification_args(p)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--grid", type=int, default=8, help="images in grid.png (0 = none)")
    p.add_argument("--out", default="runs/purify")
    args = p.parse_args(argv)
    args.nfe = DEFAULT_NFE[args.sampler] if args.nfe is None else args.nfe
    return args


def image_noise(args, idx, device):
    """The noise of images idx, keyed by (seed, image index) only."""
    return KeyedNoise(torch.tensor([sample_seed(args.seed, i) for i in idx], device=device))


def save_grid(path, rows):
    """rows: list of (n, 3, H, W) tensors in [0, 1] -> one PNG, a row each."""
    grid = torch.cat([torch.cat(list(r.clamp(0, 1).cpu()), dim=2) for r in rows], dim=1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    sched = make_schedule(args.sampler, args.nfe, args.t_star, args.eta)
    unet, classifier, images, labels = load_inputs(args, d.device)
    purifier = ddpm_purifier(unet, sched)
    precision = resolve_precision(args.precision, d.device)
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
            correct[0] += (classifier(x).argmax(1) == y).sum()
            correct[1] += (classifier(x_pur).argmax(1) == y).sum()
            progress.update(len(idx))
    d.all_sum(correct)
    seconds = time.time() - t0
    if not d.master:
        return
    n = len(labels)
    results = {"args": vars(args), "precision": precision, "timesteps": sched.timesteps,
               "model_calls": len(sched.timesteps), "n": n,
               "classifier_accuracy": 100 * correct[0].item() / n,
               "purified_accuracy": 100 * correct[1].item() / n,
               "seconds": seconds, "images_per_s": n / seconds}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"), results)
    if args.grid:
        k = min(args.grid, n)
        x = to_float(images[:k].to(d.device))
        trace = []
        with torch.no_grad(), autocast(d.device, precision):
            x_pur = purifier(x, image_noise(args, range(k), d.device), trace=trace).float()
        save_grid(os.path.join(args.out, "grid.png"), [x, (trace[0].float() + 1) / 2, x_pur])
    row = {"sampler": args.sampler, "NFE": args.nfe, "t*": sched.t_star, "N": n,
           "classifier": f"{results['classifier_accuracy']:.2f}",
           "purified (clean)": f"{results['purified_accuracy']:.2f}"}
    print(markdown_table([row], list(row)))
    print(f"timesteps: {sched.timesteps[:6]}{' ...' if len(sched.timesteps) > 6 else ''}  "
          f"({len(sched.timesteps)} UNet calls)  {results['images_per_s']:.1f} img/s  -> {args.out}")
    return results


if __name__ == "__main__":
    run_main(main)
