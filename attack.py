"""Attacks with exact gradients against diffusion-based purification (SPEC.md, "Attack and evaluation").

    python attack.py --preset smoke          # every family and setting on tiny built-in models, ~1 min on CPU
    python attack.py --setting white-box --norm linf --defense ddpm --ddpm DIR --classifier CKPT \\
        --data PATH                           # the paper's PGD20-EoT10 on DP_DDPM (NFE 100)
    python attack.py --defense vpsde --vpsde checkpoint_8.pth ...      # DiffPure (VP-SDE, DDPM++)
    python attack.py --defense edm --edm edm-cifar10-32x32-uncond-vp.pkl ...   # ADDT's EDM purification
    python attack.py --defense gdmp --guidance mse --ddpm DIR ...      # GDMP (guided DDPM; none | mse | ssim)
    python attack.py --attack autoattack-rand-fixed ...                # the paper's fixed AutoAttack (rand)
    python attack.py --protocol worst-10 --track best ...              # stricter protocols
    python attack.py --fast ...          # bf16 on CUDA, channels_last, compile, per-call checkpointing, --chunk auto
    torchrun --nproc_per_node=4 attack.py ... --num-images 1024        # shards the images; identical records

Attacks (--attack): pgd (the paper's: zero start, CE, gradients summed over --eot draws, --random-start
optional), apgd-ce and apgd-dlr (Croce & Hein 2020, with EoT), autoattack-rand-fixed (the paper's fix:
APGD-CE then APGD-DLR with EoT 20, every candidate evaluated 20 times, an example replaced only when its
fraction classified correctly drops) and autoattack-rand (upstream: one stochastic pass decides).

Settings (the attacker's knowledge of the defence's randomness; every family):
  white-box  every purification draws fresh noise (EoT over --eot draws per step)
  dw-fwd     the forward noise (for EDM the initial noise) is fixed per image and shared with the
             final evaluation (EoT 1)
  dw-both    every noise fixed and shared: a deterministic defence (EoT 1)
  dw-semi    the randomness is one of --semi-n fixed noise sets per image; the attack averages over
             the sets (EoT --semi-n, cycling through them), the evaluation draws one of them

Protocols (--protocol; named in every record and summary): single (one fresh purification of the final
x_adv: the paper), mean-K (expected accuracy over K purifications), worst-N (robust only if all N are
right), majority-N; --track best keeps per image the iterate worst for the defence (PGD only).

Every random draw is keyed by (seed, image index, stage, step, draw), so records do not depend on batch
size, process count or where a run was resumed (given as many CPU threads per process: CPU kernels split
their sums by thread count, which moves the last float bits). Outputs in --out: records-RANK.jsonl (one
line per image), summary.json and summary.md (accuracies with Wilson 95 % intervals, the bare classifier's
accuracy on the final x_adv), args.json; with --save-adv the adversarial images (adv/), with
--log-trajectory the per-step loss, correctness and norms in each record (and --trajectory-deltas M
the perturbations of the first M images).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from addt_attacks import (ATTACK, PROBE_PIPELINES, SETTINGS, Defense, NonFiniteError, apgd, autoattack_rand,
                          parse_protocol, pgd_eot, summarize_records)
from addt_common import (Dist, Progress, UserError, append_jsonl, atomic_save, atomic_write_bytes, check_out_dir,
                         check_positive, check_range, lock_out, markdown_table, read_json, read_jsonl, refuse_overwrite,
                         remove_stale_tmp, require, resolve_precision, run_main, unlock_out, write_json, write_text)
from addt_data import shard, to_float
from addt_diffusion import (DEFENSES, FAMILY_FLAGS, add_purification_args, build_purifier, check_purification_args,
                            check_selective, load_inputs, speed_settings)

ATTACKS = ["pgd", "apgd-ce", "apgd-dlr", "autoattack-rand-fixed", "autoattack-rand"]
BUDGETS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1)}  # (eps, PGD step size) on [0, 1] images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", choices=ATTACKS, default="pgd")
    p.add_argument("--setting", choices=SETTINGS, default="white-box")
    p.add_argument("--semi-n", type=int, default=128, help="noise sets of dw-semi")
    p.add_argument("--norm", choices=list(BUDGETS), default="linf")
    p.add_argument("--eps", type=float, default=None, help="budget (default 8/255 linf, 0.5 l2)")
    p.add_argument("--step-size", type=float, default=None, help="PGD step (default 2/255 linf, 0.1 l2)")
    p.add_argument("--steps", type=int, default=None, help="iterations (default 20 PGD, 100 APGD / AutoAttack)")
    p.add_argument("--eot", type=int, default=None, help="EoT draws per step (default 10 white-box, 1 dw-fwd/dw-both, "
                   "semi-n dw-semi; 20 for AutoAttack)")
    p.add_argument("--random-start", action="store_true", help="PGD: start uniformly in the eps ball (paper: off)")
    p.add_argument("--restarts", type=int, default=None, help="APGD restarts (default 1)")
    p.add_argument("--aa-draws", type=int, default=None,
                   help="autoattack-rand-fixed: evaluations of every candidate (default 20)")
    p.add_argument("--protocol", default="single", help="single | mean-K | worst-N | majority-N")
    p.add_argument("--track", choices=["final", "best"], default="final",
                   help="best: keep per image the iterate worst for the defence, evaluated after every step (PGD)")
    p.add_argument("--save-adv", choices=["pt", "png"], default=None,
                   help="save the final adversarial images: pt = float deltas (exact), png = uint8 images")
    p.add_argument("--log-trajectory", action="store_true",
                   help="PGD: per step the loss, the protocol's correctness and the perturbation's norms")
    p.add_argument("--trajectory-deltas", type=int, default=0,
                   help="with --log-trajectory: also save the perturbation of every step for the first M images")
    add_purification_args(p, DEFENSES + ["none"])
    add_memory_args(p)
    p.add_argument("--out", default="runs/attack")
    p.add_argument("--resume", action="store_true", help="skip images already in OUT/records-*.jsonl")
    p.add_argument("--preset", choices=["smoke"], default=None)
    args = p.parse_args(argv)
    if args.preset:
        given = {k for k, v in vars(args).items() if v != p.get_default(k)} - {"preset", "out", "device", "resume"}
        require(not given, f"--preset smoke sets every flag itself; it takes only --out, --device and --resume "
                           f"(given: {', '.join('--' + k.replace('_', '-') for k in sorted(given))})")
        args.out = SMOKE_OUT if args.out == p.get_default("out") else args.out
        check_out_dir(args.out)
        return args
    return check_args(args)


def add_memory_args(p, batch_size=True):
    """--chunk, --grad-checkpoint and --batch-size (attack.py; analyze.py has its own --batch-size)."""
    p.add_argument("--chunk", default=None, help="pipelines (image x EoT draw) per forward/backward, or auto (sized "
                   "from the free memory; --fast's choice); results depend on it, not on --batch-size (default 64)")
    p.add_argument("--grad-checkpoint", choices=["auto", "on", "off", "selective"], default=None,
                   help="recompute each network call in the backward pass (auto, the default: when the graph would "
                        "not fit; on with --fast); selective keeps conv/matmul/attention outputs")
    if batch_size:
        p.add_argument("--batch-size", type=int, default=None,
                       help="images attacked together (default 64; with --chunk auto, chunk / EoT)")


def check_memory_args(args):
    """The memory flags' defaults (--fast: per-call checkpointing and a chunk sized from free memory)."""
    if args.chunk is None:
        args.chunk = "auto" if args.fast else 64
    elif args.chunk != "auto":
        try:
            args.chunk = int(args.chunk)
        except ValueError:
            raise UserError(f"--chunk takes a positive integer or auto, not {args.chunk!r}") from None
    args.chunk_auto = args.chunk == "auto"
    args.grad_checkpoint = args.grad_checkpoint or ("on" if args.fast else "auto")
    if args.grad_checkpoint == "selective":
        check_selective()
    check_positive(args, "batch_size")
    require(args.chunk_auto or args.chunk > 0, f"--chunk must be positive, not {args.chunk}")


def build_defense(args, purifier, classifier, device, shape=(3, 32, 32), setting=None, eot=None):
    """The Defense that attack.py runs for its parsed flags (bench.py's rows and analyze.py build theirs
    here too): precision, checkpointing, and with --chunk auto the chunk sized now from the free memory
    (Defense.prepare on a probe shaped like the images; the content does not matter)."""
    defense = Defense(purifier, classifier, setting or args.setting, args.seed, getattr(args, "semi_n", 128),
                      args.chunk, resolve_precision(args.precision, device), args.grad_checkpoint)
    if args.chunk == "auto":
        eot = eot or getattr(args, "eot", 1) or 1
        pipes = [(i, 0, d) for i in range(PROBE_PIPELINES) for d in range(eot)][:PROBE_PIPELINES]
        defense.prepare(torch.full((len(pipes), *shape), 0.5, device=device), pipes, ATTACK, eot)
    return defense


def speed_record(args, defense):
    """What the run's speed and memory settings resolved to: printed at the start, kept in the summary."""
    return {**speed_settings(args, defense.precision), "chunk": defense.chunk,
            "chunk_info": defense.chunk_info, "grad_checkpoint": args.grad_checkpoint,
            "checkpoint_info": defense.checkpoint_info, "batch_size": args.batch_size}


def speed_line(record):
    ck = record["checkpoint_info"]
    ck = "decided at the first gradient" if ck is None else ck["on"]
    info = record["chunk_info"] or {}
    chunk = f"{record['chunk']}" + (f" (auto: {info['bytes_per_pipeline'][info['sized_for_checkpoint']] / 2 ** 20:.1f} "
                                    f"MiB per pipeline, {(info['available_bytes'] or 0) / 2 ** 30:.1f} GiB free, cap "
                                    f"{info['cap']})" if info.get("request") == "auto" else "")
    return (f"speed: precision {record['precision']}, channels_last {record['channels_last']}, compile "
            f"{record['compile']}, grad checkpoint {record['grad_checkpoint']} -> {ck}, chunk {chunk}, "
            f"batch {record['batch_size']} images")


def adopt_chunk(args):
    """--resume with --chunk auto takes the chunk the records were made with (args.json), so a resumed run
    is the same run whatever memory is free now."""
    path = os.path.join(args.out, "args.json")
    if args.chunk == "auto" and os.path.exists(path):
        try:
            before = read_json(path, "args.json")
        except UserError:
            return
        if isinstance(before.get("chunk"), int):
            args.chunk = before["chunk"]


def check_args(args):
    """Fill the attack- and setting-dependent defaults and refuse impossible combinations, before loading."""
    check_out_dir(args.out)
    pgd, aa = args.attack == "pgd", args.attack.startswith("autoattack")
    eps, step = BUDGETS[args.norm]
    args.eps = eps if args.eps is None else args.eps
    require(pgd or args.step_size is None, "--step-size is PGD's; APGD chooses its own step sizes")
    args.step_size = step if args.step_size is None and pgd else args.step_size
    args.steps = (20 if pgd else 100) if args.steps is None else args.steps
    require(args.attack.startswith("apgd") or args.restarts is None, "--restarts applies to --attack apgd-ce/apgd-dlr")
    args.restarts = 1 if args.restarts is None and args.attack.startswith("apgd") else args.restarts
    require(args.attack == "autoattack-rand-fixed" or args.aa_draws is None, "--aa-draws applies to "
            "--attack autoattack-rand-fixed (upstream decides from one pass)")
    args.aa_draws = 20 if args.aa_draws is None and args.attack == "autoattack-rand-fixed" else args.aa_draws
    require(pgd or not (args.random_start or args.track != "final" or args.log_trajectory),
            "--random-start, --track best and --log-trajectory are options of --attack pgd")
    require(args.log_trajectory or not args.trajectory_deltas, "--trajectory-deltas needs --log-trajectory")
    check_range(args, "eps", 0, float("inf"), hi_open=True)
    check_memory_args(args)
    check_positive(args, "step_size", "eot", "semi_n", "restarts", "aa_draws")
    require(args.steps >= (0 if pgd else 1), f"--steps must be at least {0 if pgd else 1}, not {args.steps}")
    require(args.trajectory_deltas >= 0, f"--trajectory-deltas must be >= 0, not {args.trajectory_deltas}")
    try:
        parse_protocol(args.protocol)
    except ValueError as e:
        raise UserError(f"--protocol: {e}") from None
    check_purification_args(args)
    default_eot = {"white-box": 20 if aa else 10, "dw-fwd": 1, "dw-both": 1, "dw-semi": args.semi_n}[args.setting]
    if args.defense == "none":
        require(args.eot in (None, 1) and args.setting == "white-box", "--defense none attacks the bare classifier: "
                "it has no randomness, so --setting and --eot do not apply (leave them at their defaults)")
        default_eot = 1
    args.eot = default_eot if args.eot is None else args.eot
    require(args.setting != "dw-both" or args.eot == 1, "dw-both fixes every noise, so all EoT draws are the same: "
                                                        "drop --eot")
    return args


# ---------------------------------------------------------------- records, resume, summary

# flags that do not change any record: everything else must be the same to --resume (--save-adv too: a run
# saves the images of all its records or of none)
RUN_ONLY_FLAGS = {"out", "resume", "batch_size", "device", "compile", "channels_last", "preset", "grad_checkpoint",
                  "fast", "compile_mode", "chunk_auto"}


def fingerprint(args):
    """A short hash of the flags that decide the records: every record carries it, so a resume can check
    the records even when args.json is lost."""
    kept = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY_FLAGS}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_records(out):
    """Every complete record in OUT/records-*.jsonl by image index (a line cut by a kill is left out).
    A record holding NaN or inf is refused: no accuracy may be computed from it."""
    records = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out), "records-*.jsonl"))):
        for r in read_jsonl(path):
            if bad := next((k for k, v in r.items() if not finite(v)), None):
                raise UserError(f"{path}: the record of image {r.get('index')} holds {bad} = {r[bad]}, not a finite "
                                "number, so no accuracy is computed from it; attack again in a new --out")
            records[r["index"]] = r
    return records


def finite(v):
    """No NaN or inf in a record's value (numbers, or lists and dicts of them)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(map(finite, v))
    return all(map(finite, v.values())) if isinstance(v, dict) else True


def changed_flags(args, before):
    """The flags that decide the records and differ between args and an earlier run's `before` (its
    args.json or summary's args), sorted."""
    now = json.loads(json.dumps(vars(args), default=str))
    return sorted(k for k, v in now.items() if k not in RUN_ONLY_FLAGS and before.get(k, v) != v)


def check_same_attack(args):
    """Records are only ever added to those of the same attack: a folder holding records takes --resume
    (even when args.json and the summary were lost), and --resume must keep the flags (args.json's, and
    the fingerprint every record carries)."""
    records = read_records(args.out)
    if not args.resume:
        require(not records, f"{args.out} holds the records of {len(records)} attacked images (records-*.jsonl): "
                             "pass --resume to continue that run, or another --out")
        return
    path = os.path.join(args.out, "args.json")
    try:
        before = read_json(path, "args.json") if os.path.exists(path) else None
    except UserError:
        before = None  # cut: the records' fingerprints decide below
    if before is not None:
        changed = changed_flags(args, before)
        require(not changed, f"--resume with other settings than the records in {args.out} were made with "
                             f"({', '.join('--' + k.replace('_', '-') for k in changed)}); use those settings or another --out")
    if args.chunk == "auto":
        return  # the chunk is sized after loading; main() checks the records' fingerprints then
    runs = {r.get("run") for r in records.values()}
    require(runs <= {fingerprint(args)}, f"--resume: the records in {args.out} were made with other settings "
                                         "(their fingerprint differs); use those settings or another --out")


def save_adv(out, fmt, rank, idx, x, x_adv):
    """The final adversarial images: exact float deltas (pt) or uint8 PNGs named by image index (png)."""
    folder = os.path.join(out, "adv")
    os.makedirs(folder, exist_ok=True)
    if fmt == "pt":
        atomic_save({"index": torch.tensor(idx), "delta": (x_adv - x).cpu()},
                    os.path.join(folder, f"{rank}-{idx[0]:06d}.pt"))
        return
    for i, img in zip(idx, x_adv):
        a = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        atomic_write_bytes(os.path.join(folder, f"{i:06d}.png"),
                           lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))


def run_attack(defense, args, x, y, idx, on_step):
    """The chosen attack on one batch -> (x_adv, records, per-image trajectory dicts or None)."""
    if args.attack == "pgd":
        traj = [] if args.log_trajectory else False
        x_adv, records = pgd_eot(defense, x, y, idx, args.eps, args.step_size, args.steps, args.eot, args.norm,
                                 on_step=on_step, random_start=args.random_start, protocol=args.protocol,
                                 track=args.track, trajectory=traj, trajectory_deltas=args.trajectory_deltas)
        return x_adv, records, traj or None
    if args.attack.startswith("apgd"):
        x_adv, records = apgd(defense, x, y, idx, args.attack[5:], args.norm, args.eps, args.steps, args.restarts,
                              args.eot, protocol=args.protocol)
    else:
        version = "fixed" if args.attack.endswith("fixed") else "upstream"
        x_adv, records = autoattack_rand(defense, x, y, idx, args.norm, args.eps, version, args.eot, args.steps,
                                         args.aa_draws or 1, protocol=args.protocol)
    on_step(args.steps)
    return x_adv, records, None


def save_trajectory(out, rank, records, traj):
    """Per-step lists go into the records; the perturbations of the first M images into a tensor file."""
    deltas = [t for t in traj if "delta" in t]
    for r, t in zip(records, traj):
        r["trajectory"] = {k: v for k, v in t.items() if k not in ("index", "delta")}
    if deltas:
        atomic_save({"index": torch.tensor([t["index"] for t in deltas]), "deltas": torch.stack([t["delta"] for t in deltas])},
                    os.path.join(out, f"trajectory-deltas-{rank}-{deltas[0]['index']:06d}.pt"))


def summarize(args, purifier, classifier, defense, records, attacked, seconds, precision):
    """Accuracies over all records (the protocol's, with Wilson intervals); speed over this run's images."""
    rs = [records[i] for i in sorted(records)]
    info = purifier.info if purifier else {}
    return {"args": vars(args), "attack": args.attack, **summarize_records(rs), "precision": precision,
            "purifier": info, "timesteps": info.get("timesteps", []), "model_calls": info.get("model_calls", 0),
            "classifier_norm": getattr(classifier, "norm_info", None), "grad_checkpoint": defense.checkpoint_info,
            "speed": speed_record(args, defense),
            "attacked_this_run": attacked, "seconds": seconds, "images_per_s": attacked / max(seconds, 1e-9)}


def attack_name(a):
    if a["attack"] == "pgd":
        return f"PGD{a['steps']}-EoT{a['eot']}" + ("-RS" if a["random_start"] else "")
    if a["attack"].startswith("apgd"):
        return f"{a['attack'].upper()}{a['steps']}-EoT{a['eot']}"
    return f"AA-rand{'-fixed' if a['attack'].endswith('fixed') else ''}-EoT{a['eot']}"


def summary_row(s):
    a = s["args"]
    ci = lambda key: f"[{s[key][0]:.1f}, {s[key][1]:.1f}]"  # noqa: E731
    defense = a["defense"] + ("+langevin" if a.get("corrector") == "langevin" else "")  # vpsde's extra corrector
    row = {"defense": defense, "calls": s["model_calls"] or "-",
           "setting": a["setting"] + (f"-{a['semi_n']}" if a["setting"] == "dw-semi" else ""),
           "attack": f"{attack_name(a)} {a['norm']}", "protocol": s["protocol"] + ("/best" if a["track"] == "best" else ""),
           "N": s["n"], "clean": f"{s['clean_accuracy']:.2f} {ci('clean_ci')}",
           "robust": f"{s['robust_accuracy']:.2f} {ci('robust_ci')}",
           "classifier on x_adv": f"{s['classifier_accuracy_adv']:.2f}"}
    if "autoattack_robust_accuracy" in s:
        row["AutoAttack's number"] = f"{s['autoattack_robust_accuracy']:.2f}"
    return row


def write_summary(args, summary):
    write_json(os.path.join(args.out, "summary.json"), summary)
    table = markdown_table([summary_row(summary)], list(summary_row(summary)))
    write_text(os.path.join(args.out, "summary.md"), table + "\n")
    print(table)


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.preset == "smoke":
        return smoke(args)
    d = Dist(args.device)

    def take_folder():
        for name in ("args.json", "summary.json"):
            refuse_overwrite(os.path.join(args.out, name), args.resume)
        lock_out(args.out)
        remove_stale_tmp(os.path.join(args.out, "adv"))
        if args.resume:
            adopt_chunk(args)
        check_same_attack(args)
    d.agree(take_folder)
    defended = args.defense != "none"
    model, classifier, images, labels = load_inputs(args, d.device, defended=defended)
    purifier = build_purifier(args, model) if defended else None
    defense = build_defense(args, purifier, classifier, d.device, tuple(images.shape[1:]))
    if args.chunk == "auto":  # every process runs the same chunk: the smallest any of them can hold
        chunk = torch.tensor(defense.chunk, device=d.device)
        if d.ddp:
            torch.distributed.all_reduce(chunk, op=torch.distributed.ReduceOp.MIN)
        args.chunk = defense.chunk = defense.chunk_info["chunk"] = int(chunk)
        if args.resume:
            check_same_attack(args)  # now that the chunk is known, the records' fingerprints are checked
    args.batch_size = args.batch_size or (max(1, args.chunk // args.eot) if args.chunk_auto else 64)
    precision = defense.precision
    path = os.path.join(args.out, f"records-{d.rank}.jsonl")
    done = {}
    if args.resume:
        read_jsonl(path, repair=True)  # a line cut by a kill is dropped now, so it is redone once
        d.barrier()
        done = read_records(args.out)
    start, stop = shard(args.n, d.rank, d.world)
    todo = [i for i in range(start, stop) if i not in done]
    attacked = int(d.all_sum(torch.tensor(len(todo), device=d.device)))
    summary_path = os.path.join(args.out, "summary.json")
    if attacked == 0 and os.path.exists(summary_path):  # a finished run: its summary (and timing) stays
        if d.master:
            summary = read_json(summary_path, "summary.json")
            print(markdown_table([summary_row(summary)], list(summary_row(summary))))
            print(f"nothing left to attack in {args.out}: the summary above is the finished run's")
        unlock_out(args.out)
        return read_json(summary_path, "summary.json") if d.master else None
    if d.master:
        write_json(os.path.join(args.out, "args.json"), vars(args))
        print(f"attack: {args.attack} {args.setting} {args.norm} on {args.defense}, protocol {args.protocol}, "
              f"{args.n} images ({len(done)} already recorded), {d.world} process(es)", flush=True)
        print(speed_line(speed_record(args, defense)), flush=True)
    progress = Progress(len(todo) * args.steps, args.attack, "img-steps", enabled=d.master)
    run_id, t0 = fingerprint(args), time.time()
    for lo in range(0, len(todo), args.batch_size):
        idx = todo[lo:lo + args.batch_size]
        x = to_float(images[idx].to(d.device))
        y = labels[idx].to(d.device)
        try:
            x_adv, records, traj = run_attack(defense, args, x, y, idx, lambda k=1: progress.update(k * len(idx)))
        except NonFiniteError as e:
            raise UserError(str(e)) from None
        if traj is not None:
            save_trajectory(args.out, d.rank, records, traj)
        if args.save_adv:
            save_adv(args.out, args.save_adv, d.rank, idx, x, x_adv)
        append_jsonl(path, [{**r, "run": run_id} for r in records])
        if d.master and lo == 0 and defense.checkpoint_info is not None and args.grad_checkpoint == "auto":
            print(f"gradient checkpointing: {'on' if defense.checkpointing else 'off'} ({defense.checkpoint_info})",
                  flush=True)
    d.barrier()
    if not d.master:
        unlock_out(args.out)
        return None
    records = read_records(args.out)
    missing = [i for i in range(args.n) if i not in records]
    if missing:
        raise UserError(f"{len(missing)} images have no record (first: {missing[0]}); rerun with --resume")
    summary = summarize(args, purifier, classifier, defense, {i: records[i] for i in range(args.n)}, attacked,
                        time.time() - t0, precision)
    write_summary(args, summary)
    print(f"{summary['images_per_s']:.3f} img/s  -> {args.out}")
    unlock_out(args.out)
    return summary


# ---------------------------------------------------------------- smoke preset: tiny built-in models

TINY_UNET_CONFIG = dict(sample_size=32, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                        up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
TINY_VPSDE_CONFIG = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
TINY_EDM_CONFIG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])


def synthetic_images(n_per_class, n_classes=10, size=32, seed=0):
    """Images whose class is a colour plus smooth noise: learnable in seconds."""
    # class colours close together (about 0.1 apart), so an 8/255 attack can flip the bare classifier
    palette = 0.45 + 0.1 * torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * n_classes
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    noise = torch.nn.functional.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size,
                                            mode="bilinear")
    x = palette[labels] + 0.1 * (noise - 0.5)
    return (x * 255).round().to(torch.uint8), labels


def make_smoke_inputs(root, n_per_class=20, train_steps=60, seed=0):
    """A zip of generated images (image-folder layout), a tiny classifier trained on them for a few
    seconds and untrained tiny diffusion models of every family (a diffusers UNet folder, a score_sde
    checkpoint, an EDM state dict). Returns their paths."""
    import zipfile
    from io import BytesIO

    import torch.nn.functional as F

    from addt_diffusion import new_diffusion_model, save_diffusion_model
    from models import build_classifier, classifier_checkpoint
    from models.unet import UNet
    paths = {"data": os.path.join(root, "images.zip"), "classifier": os.path.join(root, "classifier.pt"),
             "ddpm": os.path.join(root, "unet"), "vpsde": os.path.join(root, "vpsde"), "edm": os.path.join(root, "edm")}
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
    save_diffusion_model("vpsde", new_diffusion_model("vpsde", TINY_VPSDE_CONFIG), paths["vpsde"])
    save_diffusion_model("edm", new_diffusion_model("edm", TINY_EDM_CONFIG), paths["edm"])
    return paths


SMOKE_OUT = "runs/smoke"


def fresh_smoke_folder(out, resume):
    """Each smoke run re-checks the install from scratch: the smoke results of an earlier run in OUT (the
    models, the data and every attack: all named smoke-*) are removed, unless --resume continues them. A
    folder holding anything else is refused, so no other run's results are touched."""
    lock_out(out)
    names = sorted(set(os.listdir(out)) - {".lock"})
    others = [n for n in names if not n.startswith("smoke-")]
    require(not others, f"--out {out} holds files the smoke preset did not write ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}): use another --out")
    if names and not resume:
        print(f"note: replacing the earlier smoke results in {out} (--resume continues them instead)", flush=True)
        for n in names:
            shutil.rmtree(os.path.join(out, n))


def smoke(args):
    """Every family and every setting end to end on the tiny models (and both norms, the bare classifier
    and the fixed AutoAttack on DP_DDPM), a few seconds each."""
    t0 = time.time()
    fresh_smoke_folder(args.out, args.resume)
    inputs = make_smoke_inputs(os.path.join(args.out, "smoke-inputs"))
    family_flags = {"ddpm": ["--nfe", "5"], "vpsde": ["--nfe", "5"], "edm": ["--edm-steps", "3"],
                    "gdmp": ["--t-star", "0.003", "--gdmp-iters", "2", "--guidance", "ssim"]}
    runs = ([("none", "white-box", "linf", [])] + [("ddpm", "white-box", "l2", [])]
            + [(f, s, "linf", []) for f in ("ddpm", "vpsde", "edm", "gdmp") for s in SETTINGS]
            + [("ddpm", "white-box", "linf", ["--attack", "autoattack-rand-fixed", "--steps", "2", "--eot", "2",
                                              "--aa-draws", "3"])])
    rows = []
    for defense, setting, norm, extra in runs:
        name = "-".join([defense, setting, norm] + ([extra[1]] if extra else []))
        out = os.path.join(args.out, f"smoke-{name}")
        argv = ["--defense", defense, "--setting", setting, "--norm", norm, "--out", out, "--n", "4",
                "--batch-size", "2", "--chunk", "8", "--semi-n", "3", "--device", args.device or "cpu",
                "--classifier", inputs["classifier"], "--data", inputs["data"], *extra]
        if defense != "none":
            argv += [f"--{FAMILY_FLAGS[defense]}", inputs[FAMILY_FLAGS[defense]], *family_flags[defense]]
            argv += ["--steps", "2"] if not extra else []
            argv += ["--eot", "2"] if setting == "white-box" and not extra else []
        if os.path.isdir(out):
            argv.append("--resume")
        rows.append(summary_row(main(argv)))
    print("\nsmoke test (tiny untrained diffusion models, generated images; checks the install, not the paper):")
    print(markdown_table(rows, list(rows[0])))
    print(f"smoke preset finished in {time.time() - t0:.0f} s")
    unlock_out(args.out)
    return rows


if __name__ == "__main__":
    run_main(main)
