"""Train the classifier that purification defends (SPEC.md "Classifier"): the usual CIFAR recipe of
200 epochs of SGD (momentum 0.9, lr 0.1 with per-epoch cosine decay, weight decay 5e-4), global batch
128, 4-pixel-padded random crop + horizontal flip. WRN-28-10 reaches 95.12 % on CIFAR-10 in the paper.

    python train_classifier.py --arch wrn-28-10 --data cifar10 --out runs/wrn-28-10
    torchrun --nproc_per_node=8 train_classifier.py --arch wrn-28-10 --data cifar10 --out runs/wrn-28-10
    python train_classifier.py --data cifar100 --out runs/wrn-28-10-c100 \\
        --mean 0.5071 0.4865 0.4409 --std 0.2673 0.2564 0.2762
    python train_classifier.py --out runs/wrn-28-10 --resume      # continue after the last finished epoch

Writes OUT/args.json; OUT/ckpt.pt after every epoch (weights, optimizer, epoch, history, flags;
written atomically); at the end OUT/classifier.pt (what `--classifier` of purify.py, attack.py and
train_addt.py loads) and OUT/results.json. Under torchrun each process takes global batch / N images
per step. Data order, augmentation and any other randomness are keyed by (seed, rank, epoch), so a
run resumed at an epoch boundary gives the same weights, bit for bit, as one never interrupted (on
CUDA only up to cuDNN's non-deterministic kernels).
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from addt_common import (Dist, Progress, UserError, atomic_save, autocast, check_device, check_finite_weights,
                         check_out_dir, check_positive, check_range, format_seconds, load_checkpoint, lock_out,
                         markdown_table, refuse_overwrite, require, resolve_precision, run_main, sample_seed,
                         unlock_out, write_json)
from addt_data import check_fits, epoch_indices, load_split, random_crop_flip, shard, to_float
from models import CIFAR10_MEAN, CIFAR10_STD, build_classifier, classifier_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wrn-28-10", help="wrn-28-10, wrn-34-10, wrn-70-16, resnet50, vgg16 or "
                   "any wrn-DEPTH-WIDTH")
    p.add_argument("--data", default="cifar10", help="cifar10, cifar100, tinyimagenet or a path load_split reads")
    p.add_argument("--out", default="runs/classifier")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=128, help="images per step, summed over processes")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--mean", type=float, nargs=3, default=list(CIFAR10_MEAN), help="input normalisation, "
                   "stored in the checkpoint and applied inside the classifier")
    p.add_argument("--std", type=float, nargs=3, default=list(CIFAR10_STD))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut every epoch short (trials, tests)")
    p.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test images (default all)")
    p.add_argument("--eval-batch", type=int, default=500, help="per process")
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="fp32",
                   help="fp32 (default, as every script); bf16 autocast is the fast path (auto: bf16 on CUDA, "
                        "fp32 on CPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (the same flags)")
    p.add_argument("--extend", action="store_true", help="with --resume: continue to a larger --epochs (the cosine "
                   "schedule is recomputed for the new length, never restarted)")
    return check_args(p.parse_args(argv))


def check_args(args):
    """Every numeric flag, before anything is loaded."""
    check_positive(args, "epochs", "global_batch", "eval_n", "eval_batch", "max_steps_per_epoch", "lr")
    check_range(args, "weight_decay", 0, math.inf, hi_open=True)
    check_range(args, "momentum", 0, 1)
    require(args.seed >= 0, f"--seed must be non-negative, not {args.seed}")
    require(all(math.isfinite(v) for v in args.mean + args.std) and min(args.std) > 0,
            f"--mean must be finite and --std positive, not {args.mean} / {args.std}")
    require(not args.extend or args.resume, "--extend continues a run: pass it with --resume")
    check_device(args.device)
    check_out_dir(args.out)
    return args


# flags that change the weights a run produces: --resume must keep them (--epochs only with --extend)
RESULT_FLAGS = ("arch", "data", "epochs", "global_batch", "lr", "momentum", "weight_decay", "mean", "std", "seed",
                "max_steps_per_epoch", "precision", "channels_last", "world")


def check_same_run(before, args, world):
    now = {**vars(args), "world": world}
    changed = [k for k in RESULT_FLAGS if k in before and before[k] != now[k] and not (k == "epochs" and args.extend)]
    diffs = ", ".join(f"--{k.replace('_', '-')} {before[k]} -> {now[k]}" for k in changed)
    require(not changed, f"--resume with other settings than the checkpoint was made with ({diffs}); use the same "
            "flags (--extend allows a larger --epochs) or another --out")
    require(not args.extend or args.epochs >= before["epochs"],
            f"--extend makes a run longer: --epochs {args.epochs} < {before['epochs']}")


def cosine_lr(lr, epoch, epochs):
    """lr of `epoch` on a cosine from lr to 0 over `epochs` (CosineAnnealingLR's curve, closed form, so
    an extended run follows the new length from where it is)."""
    return 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))


def train_epoch(model, opt, images, labels, idx, per_rank, g, amp, args, progress):
    """One pass over this rank's indices, per_rank images per step. Returns (loss sum, correct, seen)
    as a device tensor, so the loop never waits for the GPU except to print."""
    model.train()
    stats = torch.zeros(3, dtype=torch.float64, device=images.device)
    steps = len(idx) // per_rank
    for k, i in enumerate(idx.split(per_rank)):
        x, y = random_crop_flip(to_float(images[i]), pad=4, flip=True, generator=g), labels[i]
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp():
            logits = model(x).float()
            loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):  # one host sync per step: a diverged run must not go on (or be saved)
            raise UserError(f"non-finite training loss at step {k + 1} of this epoch (lr too high? NaN in the data?); "
                            "stopped: the last checkpoint holds the weights of the last finished epoch")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over processes here
        opt.step()
        stats[0] += loss.detach() * len(y)
        stats[1] += (logits.argmax(1) == y).sum()
        stats[2] += len(y)
        extra = ""
        if progress.enabled and time.time() - progress.last >= progress.every:  # a host sync only when printing
            s = stats.tolist()
            extra = f"step {k + 1}/{steps}  loss {s[0] / s[2]:.4f}  train acc {s[1] / s[2]:.2%}"
        progress.update(args.global_batch, extra)
    return stats


@torch.no_grad()
def evaluate(classifier, images, labels, d, amp, args):
    """Top-1 accuracy: each rank classifies its contiguous shard of (images, labels), counts are summed."""
    classifier.eval()
    start, stop = shard(len(labels), d.rank, d.world)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for s in range(start, stop, args.eval_batch):
        x = to_float(images[s:min(s + args.eval_batch, stop)])
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp():
            correct += (classifier(x).argmax(1) == labels[s:s + len(x)]).sum()
    return d.all_sum(correct).item() / len(labels)


def sync_buffers(classifier, d):
    """Give every rank rank 0's BatchNorm statistics (the ones saved). DDP only broadcasts them at the
    start of each forward, so after the last step each rank holds stats updated by its own batch."""
    if d.ddp:
        for b in classifier.net.buffers():
            dist.broadcast(b, 0)


def checkpoint(classifier, args, history, world, image_size, opt=None):
    """One plain dict: models.classifier_checkpoint's keys (with the training images' size) plus the
    training state. No `rng` entry: everything random is re-seeded from (seed, rank, epoch), so resuming
    needs no RNG state. Weights with NaN or inf are never written."""
    ckpt = {**classifier_checkpoint(classifier, args.arch, image_size), "epoch": len(history),
            "args": {**vars(args), "world": world}, "history": history}
    check_finite_weights(ckpt["model"], "the classifier being trained")
    if opt is not None:
        ckpt["optimizer"] = opt.state_dict()
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    d.agree(lambda: (refuse_overwrite(os.path.join(args.out, "ckpt.pt"), args.resume), lock_out(args.out)))
    if args.global_batch % d.world:
        raise UserError(f"--global-batch {args.global_batch} does not split evenly over {d.world} processes")
    per_rank = args.global_batch // d.world
    precision = resolve_precision(args.precision, d.device)
    amp = lambda: autocast(d.device, precision)  # a fresh context each use

    # whole splits on the device as uint8: batching is indexing, no DataLoader, no workers
    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    if train.classes != test.classes:  # an image folder whose test/ lacks a class would shift the labels
        raise UserError(f"{args.data}: the train split has classes {train.classes}, the test split {test.classes}")
    check_fits(test, f"{args.data} (test)", "a classifier trained on its train split", size=train.images.shape[-2:])
    image_size = train.images.shape[-2:]  # recorded in the checkpoints: data of another size is refused later
    train_x, train_y = train.images.to(d.device), train.labels.to(d.device)
    eval_n = len(test.labels) if args.eval_n is None else min(args.eval_n, len(test.labels))
    test_x, test_y = test.images[:eval_n].to(d.device), test.labels[:eval_n].to(d.device)

    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    classifier = build_classifier(args.arch, len(train.classes), args.mean, args.std).to(d.device)
    if args.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    ckpt_path, history = os.path.join(args.out, "ckpt.pt"), []
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, "classifier training checkpoint")
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "arch" not in ckpt:
            raise UserError(f"{ckpt_path} is not a train_classifier.py training checkpoint")
        check_finite_weights({"model": ckpt["model"], "optimizer": ckpt["optimizer"]}, ckpt_path)
        if ckpt["arch"] != args.arch:
            raise UserError(f"{ckpt_path} holds a {ckpt['arch']} training checkpoint, not one of --arch "
                            f"{args.arch}; pass --arch {ckpt['arch']} or another --out")
        if ckpt["num_classes"] != len(train.classes):
            raise UserError(f"{ckpt_path} has {ckpt['num_classes']} classes, {args.data} {len(train.classes)}")
        check_same_run(ckpt["args"], args, d.world)
        classifier.net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        history = ckpt["history"]

    # epoch_indices gives every rank len // world images; steps drop the last incomplete batch
    steps = len(train_y) // d.world // per_rank
    if args.max_steps_per_epoch is not None:
        steps = min(steps, args.max_steps_per_epoch)
    if steps == 0:
        raise UserError(f"{args.data} holds {len(train_y)} training images, fewer than --global-batch "
                        f"{args.global_batch}")
    model = DDP(classifier, device_ids=[d.device] if d.device.type == "cuda" else None) if d.ddp else classifier

    if d.master:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "args.json"), {**vars(args), "world": d.world, "precision_used": precision})
        print(f"{args.arch} on {args.data} ({len(train.classes)} classes, {len(train_y)} train / {eval_n} test "
              f"images): {args.epochs} epochs of {steps} steps of {args.global_batch} ({d.world} x {per_rank}), "
              f"{precision}, from epoch {len(history)}", flush=True)
    progress = Progress((args.epochs - len(history)) * steps * args.global_batch, unit="img", every=10,
                        enabled=d.master)
    for epoch in range(len(history), args.epochs):
        torch.manual_seed(sample_seed(args.seed, d.rank, epoch, 1))  # dropout, if an arch has any
        g = torch.Generator(device=d.device).manual_seed(sample_seed(args.seed, d.rank, epoch))
        idx = epoch_indices(len(train_y), epoch, args.seed, d.rank, d.world)[:steps * per_rank].to(d.device)
        lr, t0, progress.label = cosine_lr(args.lr, epoch, args.epochs), time.time(), f"epoch {epoch + 1}/{args.epochs}"
        for group in opt.param_groups:
            group["lr"] = lr
        stats = train_epoch(model, opt, train_x, train_y, idx, per_rank, g, amp, args, progress)
        loss_sum, correct, seen = d.all_sum(stats).tolist()
        seconds = time.time() - t0
        sync_buffers(classifier, d)
        test_acc = evaluate(classifier, test_x, test_y, d, amp, args)
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_acc": test_acc, "images_per_s": seen / seconds})
        if d.master:
            atomic_save(checkpoint(classifier, args, history, d.world, image_size, opt), ckpt_path)
            eta = progress.elapsed / progress.done * (progress.total - progress.done)
            print(f"epoch {epoch + 1}/{args.epochs}  step {steps}/{steps}  loss {loss_sum / seen:.4f}  "
                  f"train acc {correct / seen:.2%}  test acc {test_acc:.2%}  {seen / seconds:.0f} img/s  "
                  f"lr {lr:.4g}  ETA {format_seconds(eta)}", flush=True)

    last = history[-1]
    results = {"arch": args.arch, "data": args.data, "num_classes": len(train.classes), "epochs": len(history),
               "test_acc": last["test_acc"], "eval_n": eval_n, "train_loss": last["train_loss"],
               "train_acc": last["train_acc"], "world": d.world, "precision": precision,
               "images_per_s": sum(h["images_per_s"] for h in history) / len(history),
               "history": history, "args": vars(args)}
    if d.master:
        atomic_save(checkpoint(classifier, args, history, d.world, image_size), os.path.join(args.out, "classifier.pt"))
        write_json(os.path.join(args.out, "results.json"), results)
        row = {"arch": args.arch, "data": args.data, "epochs": len(history), "train loss": f"{last['train_loss']:.4f}",
               "train acc": f"{last['train_acc']:.2%}", "test acc": f"{last['test_acc']:.2%}",
               "img/s": f"{results['images_per_s']:.0f}"}
        print(markdown_table([row], list(row)))
        print(f"classifier: {os.path.join(args.out, 'classifier.pt')} (use: python attack.py --classifier ...)")
    d.barrier()
    unlock_out(args.out)
    return results


if __name__ == "__main__":
    run_main(main)
