"""The paper's analysis figures, from attacks on the defended classifier classifier(purify(x, noise)) or
from finished attack.py runs. Each subcommand writes OUT/<name>.json (the numbers behind the figure, every
flag, timing) and OUT/<name>.png (matplotlib, optional: --no-plot writes the JSON only).

    python analyze.py settings runs/                        # figures 2 and 6: robust accuracy per setting
    python analyze.py eot-similarity --ddpm DIR --classifier CKPT --data PATH   # figure 7 (appendix A)
    python analyze.py semi-curve --ddpm DIR --classifier CKPT --data PATH       # figure 8 (appendix B)
    python analyze.py landscape --ddpm DIR --addt ADDT_DIR --classifier CKPT --data PATH   # figure 3 (app. C)
    python analyze.py trajectories --ddpm DIR --classifier CKPT --data PATH     # figure 1
    python analyze.py rbgm-ranks --ddpm DIR --classifier CKPT --data PATH       # figure 9 (appendix D)
    python analyze.py plot runs/analysis/landscape.json    # redraw a PNG from its JSON (after pip install matplotlib)
    torchrun --nproc_per_node=4 analyze.py landscape ... --num-images 128      # images sharded, gathered on rank 0

The model flags are attack.py's (--defense, --ddpm/--vpsde/--edm, --classifier, --data, --n, --nfe,
--seed, --precision, --device ...); noise is keyed by (seed, image, stage, step, draw) through
addt_attacks.Defense, so numbers do not depend on batch size or process count, and a subcommand's
attacks equal attack.py's runs with the same flags. Times in each --help are rough: "paper scale" is
estimated for one H100 in fp32 from the paper's 5 GPU-hours x 4 (2080 Ti) for PGD20-EoT10 on 1024 images
at NFE 100 (about 0.07 s per purification-gradient, a third of that per forward); measure with bench.py.
"""
import argparse
import glob
import math
import os
import textwrap
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attack
import train_addt
from addt_attacks import (ATTACK, EVAL, SETTINGS, NonFiniteError, pgd_eot, summarize_records,
                          wilson_interval)
from addt_common import (Dist, Progress, UserError, autocast, check_out_dir, check_positive, keyed_normal,
                         lock_out, parse_ints, read_json, refuse_overwrite, require,
                         resolve_precision, run_main, sample_seed, unlock_out, write_json)
from addt_data import shard, to_float
from addt_diffusion import (DEFENSES, FAMILY_FLAGS, add_purification_args, build_purifier, check_purification_args,
                            load_diffusion_model, load_inputs, prepare)

RANDOM_DIRECTION = 50  # key stage of semi-curve's random +-1 direction (addt_attacks uses 0..7)
FIGURES = {"settings": "figures 2 and 6", "eot-similarity": "figure 7 (appendix A)",
           "semi-curve": "figure 8 (appendix B)", "landscape": "figure 3 (appendix C)",
           "trajectories": "figure 1", "rbgm-ranks": "figure 9 (appendix D)"}


# ---------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, short, help, timing, models=True, n=128):
        figure_ = FIGURES[name][0].upper() + FIGURES[name][1:]
        s = sub.add_parser(name, help=f"{FIGURES[name]}: {short}",
                           description=textwrap.fill(f"{figure_}: {help}", 100) + "\n\n"
                           + textwrap.fill(f"Time: {timing}", 100),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if models:  # rbgm-ranks trains no GDMP and has its own --guidance (CGPO's)
            add_purification_args(s, [f for f in DEFENSES if f != "gdmp"] if name == "rbgm-ranks" else DEFENSES)
            s.set_defaults(n=n)
            s.add_argument("--batch-size", type=int, default=32, help="images processed together")
            attack.add_memory_args(s, batch_size=False)
        s.add_argument("--out", default="runs/analysis", help="folder for NAME.json and NAME.png")
        s.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
        s.add_argument("--overwrite", action="store_true", help="replace an earlier NAME.json in --out")
        return s

    def attack_flags(s, eot=10):
        s.add_argument("--norm", choices=list(attack.BUDGETS), default="linf")
        s.add_argument("--eps", type=float, default=None, help="budget (default 8/255 linf, 0.5 l2)")
        s.add_argument("--step-size", type=float, default=None, help="PGD step (default 2/255 linf, 0.1 l2)")
        s.add_argument("--steps", type=int, default=20, help="PGD steps")
        if eot:
            s.add_argument("--eot", type=int, default=eot, help="EoT draws of the white-box (EoT) attack")
        s.add_argument("--semi-n", type=int, default=128, help=argparse.SUPPRESS)

    s = command("settings", "robust accuracy per setting from attack.py runs", "robust accuracy per attack setting (white-box, dw-fwd, dw-both, dw-semi) for each "
                "defence x model, with Wilson 95 % error bars, from finished attack.py runs.",
                "seconds (reads summary.json files).", models=False)
    s.add_argument("runs", nargs="+", help="attack.py run folders, or folders searched recursively for them")
    s.add_argument("--label", action="append", default=[], metavar="MODEL=NAME",
                   help="name a model path (the run's --ddpm / --vpsde / --edm) in the figure, e.g. "
                        "runs/addt/ema=ADDT; default: the path's last two parts")

    s = command("eot-similarity", "EoT-k vs deterministic gradient, robust accuracy per EoT", "cosine similarity between the white-box EoT-k gradient and the deterministic "
                "(dw-both) gradient at the clean image, per image (mean, quartiles), and PGD robust accuracy "
                "with each EoT k.",
                "paper scale (DP_DDPM NFE 100, 128 images, k = 1..32, PGD20 per k) about 3 h on one H100 "
                "(the gradients alone, --no-attack: about 5 min); the test size (4 images, NFE 5, tiny models) "
                "a few seconds on a CPU.")
    attack_flags(s, eot=0)
    s.add_argument("--eots", default="1,2,4,8,16,32", help="EoT draws to compare, comma-separated")
    s.add_argument("--no-attack", action="store_true", help="gradients only: no PGD per EoT")
    s.add_argument("--runs", nargs="+", default=None,
                   help="take the robust accuracy per EoT from finished white-box attack.py runs instead")

    s = command("semi-curve", "loss along FGSM directions, dw-both vs dw-semi", "loss at x + k sigma, k = -K..K, with sigma the l_inf FGSM direction (sign of the "
                "gradient, magnitude 1/255) under dw-both and under dw-semi-N (gradient summed over the N noise "
                "sets), and a random +-1/255 direction. dw-both points are evaluated with its fixed noise, dw-semi "
                "points with the mean CE over the N sets (--eval-sets: the first M), the random direction with "
                "dw-both's noise (and dw-semi's with --random-semi). Images are clipped to [0, 1].",
                "paper scale (DP_DDPM NFE 100, 128 images, N = 128, K = 16) about 4 h on one H100, dominated by "
                "the 33 x 128 dw-semi evaluations per image (--eval-sets 16: about 40 min); the test size a few "
                "seconds on a CPU.")
    s.add_argument("--semi-n", type=int, default=128, help="noise sets of dw-semi")
    s.add_argument("--k-max", type=int, default=16)
    s.add_argument("--magnitude", type=float, default=1 / 255, help="l_inf size of sigma")
    s.add_argument("--eval-sets", type=int, default=None, help="dw-semi points: mean over the first M sets "
                   "(default all N)")
    s.add_argument("--random-semi", action="store_true", help="also evaluate the random direction under dw-semi")

    s = command("landscape", "loss surface with the dw-both and white-box EoT trajectories", "the 2-D loss surface spanned by the final dw-both PGD perturbation u and the part "
                "of the final white-box PGD-EoT perturbation orthogonal to it, with both attack trajectories "
                "(endpoints exact, intermediate iterates projected onto the plane); the whole batch is one "
                "vector, so one plane serves every image. Two models (--addt) are drawn side by side.",
                "paper scale (DP_DDPM NFE 100, 128 images, PGD20 and PGD20-EoT10, 21 x 21 grid) about 1 h per "
                "model on one H100; the test size a few seconds on a CPU.")
    attack_flags(s)
    s.add_argument("--addt", default=None, help="a second model of the same family (e.g. ADDT), drawn beside")
    s.add_argument("--labels", default="vanilla,ADDT", help="names of the two models")
    s.add_argument("--grid", type=int, default=21, help="grid points per axis")
    s.add_argument("--margin", type=float, default=0.25, help="grid margin around the points, as a fraction")
    s.add_argument("--surface", choices=["dw-both", "white-box"], default="dw-both",
                   help="the noise of the surface: dw-both's fixed noise, or the mean over --surface-draws "
                        "fresh draws (the same draws at every point)")
    s.add_argument("--surface-draws", type=int, default=8)
    s.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                   help="take the trajectories from attack.py runs made with --log-trajectory "
                        "--trajectory-deltas N: DW_RUN EOT_RUN per model")

    s = command("trajectories", "attack trajectories in a 2-D PCA embedding", "PGD trajectories of white-box (EoT 1), white-box EoT (--eot) and dw-both, "
                "per image in the 2-D PCA plane of its three trajectories' perturbations, coloured by the loss "
                "(mean CE over --loss-draws fresh purifications, the same draws for every point); also "
                "straightness and the final perturbations' cosine with dw-both's.",
                "paper scale (DP_DDPM NFE 100, 8 images, PGD20, EoT 10) about 5 min on one H100; the test "
                "size a few seconds on a CPU.", n=8)
    attack_flags(s)
    s.add_argument("--loss-draws", type=int, default=8)
    s.add_argument("--plot-images", type=int, default=4, help="panels in the PNG")

    s = command("rbgm-ranks", "rank histograms of CGPO perturbations, chi-square", "ranks (1..H*W) of CGPO's accumulated gradient g, before RBGM, within each "
                "image-channel row, at pixels [1,1], [8,8], [16,16] (1-based) of R, G, B over the images, "
                "as histograms with a chi-square uniformity test; also the test at every pixel.",
                "paper scale (1024 images, 5 CGPO iterations, DDPM UNet) about 1 min on one H100; the test "
                "size a few seconds on a CPU.", n=1024)
    s.set_defaults(split="train", batch_size=64)
    s.add_argument("--cgpo-iters", type=int, default=5)
    s.add_argument("--guidance", choices=["ce", "mse"], default="ce")
    s.add_argument("--dropout", type=float, default=None, help="every Dropout, model in train mode as in "
                   "training (default train_addt's: 0.1, edm 0.13)")
    s.add_argument("--lambda-unit", type=float, default=0.03)
    s.add_argument("--lambda-min", type=float, default=0.0)
    s.add_argument("--lambda-max", type=float, default=0.3)
    s.add_argument("--pixels", default="1,1 8,8 16,16", help="1-based row,col positions, space-separated")
    s.add_argument("--bins", type=int, default=32, help="histogram bins over the ranks 1..H*W")

    s = sub.add_parser("plot", help="redraw the PNG of an analysis JSON")
    s.add_argument("json", nargs="+", help="OUT/NAME.json written by a subcommand")
    args = p.parse_args(argv)
    return check_args(args)


def check_args(args):
    """Every flag checked before any model is loaded or any image attacked."""
    if args.command == "plot":
        require_matplotlib()
        for path in args.json:
            require(os.path.isfile(path), f"{path} not found")
        return args
    check_out_dir(args.out)
    if not args.no_plot:
        require_matplotlib()
    if args.command == "settings":
        for r in args.runs:
            require(os.path.isdir(r), f"{r} is not a folder (give attack.py run folders or a folder holding them)")
        args.labels = dict(parse_label(s) for s in args.label)
        return args
    check_purification_args(args)
    build_purifier(args, None)  # a bad --nfe / --t-star fails here, before any loading
    attack.check_memory_args(args)
    check_positive(args, "batch_size")
    if hasattr(args, "norm"):
        eps, step = attack.BUDGETS[args.norm]
        args.eps = eps if args.eps is None else args.eps
        args.step_size = step if args.step_size is None else args.step_size
        check_positive(args, "eps", "step_size")
        require(args.steps >= 1, f"--steps must be at least 1, not {args.steps}")
    if getattr(args, "eot", None) is not None:
        check_positive(args, "eot")
    if args.command == "eot-similarity":
        args.eots = parse_ints(args.eots, "--eots")
        require(not (args.runs and args.no_attack), "--runs and --no-attack exclude each other")
        for r in args.runs or []:
            require(os.path.isdir(r), f"--runs: {r} is not a folder")
    elif args.command == "semi-curve":
        check_positive(args, "semi_n", "magnitude")
        require(args.k_max >= 1, f"--k-max must be at least 1, not {args.k_max}")
        args.eval_sets = args.semi_n if args.eval_sets is None else args.eval_sets
        require(1 <= args.eval_sets <= args.semi_n, f"--eval-sets must lie in [1, --semi-n {args.semi_n}]")
    elif args.command == "landscape":
        args.labels = [s.strip() for s in args.labels.split(",")]
        require(len(args.labels) == 2 and all(args.labels), "--labels takes two names, e.g. vanilla,ADDT")
        require(args.grid >= 3, f"--grid must be at least 3, not {args.grid}")
        check_positive(args, "surface_draws", "margin")
        if args.addt:
            require(os.path.exists(args.addt), f"--addt {args.addt} not found")
        if args.runs:
            want = 4 if args.addt else 2
            require(len(args.runs) == want, f"--runs takes DW_RUN EOT_RUN per model: {want} folders here")
            for r in args.runs:
                require(os.path.isdir(r), f"--runs: {r} is not a folder")
    elif args.command == "trajectories":
        check_positive(args, "loss_draws", "plot_images")
    elif args.command == "rbgm-ranks":
        check_positive(args, "cgpo_iters", "bins")
        args.pixels = [tuple(parse_ints(p, "--pixels")) for p in args.pixels.split()]
        require(args.pixels and all(len(p) == 2 for p in args.pixels), "--pixels takes row,col pairs, e.g. 1,1 8,8")
        require(0 <= args.lambda_min <= args.lambda_max <= 1, "--lambda-min <= --lambda-max must lie in [0, 1]")
        args.dropout = train_addt.DROPOUT_DEFAULTS[FAMILY_FLAGS[args.defense]] if args.dropout is None else args.dropout
        require(0 <= args.dropout < 1, f"--dropout must lie in [0, 1), not {args.dropout}")
    return args


def parse_label(text):
    path, sep, name = text.rpartition("=")
    require(sep and path and name, f"--label takes MODEL_PATH=NAME, not {text!r}")
    return os.path.normpath(path), name


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the PNG needs matplotlib: pip install matplotlib (or pass --no-plot to write the JSON "
                        "only, and draw it later with `analyze.py plot OUT/NAME.json`)") from None
    matplotlib.use("Agg")


# ---------------------------------------------------------------- set-up shared by the subcommands

def take_out(args):
    """Refuse to replace an earlier result unless --overwrite; lock the folder for this run."""
    refuse_overwrite(os.path.join(args.out, f"{args.command}.json"), args.overwrite,
                     "--overwrite to replace it")
    lock_out(args.out)


def setup(args):
    """Processes, models and this process's share of the first N images."""
    d = Dist(args.device)
    d.agree(lambda: take_out(args))
    model, classifier, images, labels = load_inputs(args, d.device)
    start, stop = shard(args.n, d.rank, d.world)
    return SimpleNamespace(d=d, model=model, classifier=classifier, purifier=build_purifier(args, model),
                           precision=resolve_precision(args.precision, d.device), images=images, labels=labels,
                           idx=list(range(start, stop)), t0=time.time())


def defense(run, args, setting, purifier=None):
    """attack.py's Defense for these flags (--chunk auto: sized once, then kept for every later defence)."""
    dfn = attack.build_defense(args, purifier or run.purifier, run.classifier, run.d.device,
                               tuple(run.images.shape[1:]), setting, eot=getattr(args, "eot", 1))
    args.chunk = dfn.chunk
    return dfn


def batches(run, args):
    """(x, y, idx) of this process's images, --batch-size at a time."""
    for lo in range(0, len(run.idx), args.batch_size):
        idx = run.idx[lo:lo + args.batch_size]
        yield to_float(run.images[idx].to(run.d.device)), run.labels[idx].to(run.d.device), idx


def gather(d, items):
    """Per-image lists of every process, on every process, in image order (the shards are contiguous)."""
    if not d.ddp:
        return items
    parts = [None] * d.world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def all_sum(d, values):
    """Sum of a float64 tensor over the processes."""
    t = torch.as_tensor(values, dtype=torch.float64, device=d.device)
    return d.all_sum(t).cpu()


def set_loss(dfn, x, y, idx, draws, stage=EVAL):
    """Mean CE over `draws` purifications per image, keyed (image, step 0, draw d): the same draws at every
    x (dw-both: its fixed noise; dw-semi at stage ATTACK: set d; white-box: fresh draws d)."""
    n = len(idx)
    pipes = [(i, 0, d) for d in range(draws) for i in idx]
    _, loss, _ = dfn.run(x.repeat(draws, 1, 1, 1), y.repeat(draws), pipes, stage, eot=draws)
    return loss.view(draws, n).mean(0)


def losses_at(dfn, points, y, idx, draws, stage=EVAL):
    """set_loss at each of `points` (a list of (B, ...) image batches): (len(points), B). Several points go
    into one call, enough to fill a chunk of pipelines."""
    per = max(1, -(-dfn.chunk // (len(idx) * draws)))
    out = []
    for lo in range(0, len(points), per):
        group = points[lo:lo + per]
        loss = set_loss(dfn, torch.cat(group), y.repeat(len(group)), list(idx) * len(group), draws, stage)
        out.append(loss.view(len(group), len(idx)))
    return torch.cat(out)


def finish(run, args, data, plot):
    """Write OUT/NAME.json (and .png) on the master process."""
    if not run.d.master:
        return None
    data = {"name": args.command, "figure": FIGURES[args.command], **data,
            "args": vars(args),
            "processes": run.d.world, "device": str(run.d.device), "seconds": time.time() - run.t0}
    path = os.path.join(args.out, f"{args.command}.json")
    write_json(path, data)
    print(f"{args.command}: {path}", end="")
    if not args.no_plot:
        png = os.path.join(args.out, f"{args.command}.png")
        plot(data, png)
        print(f", {png}", end="")
    print(f"  ({data['seconds']:.1f} s)")
    unlock_out(args.out)
    return data


def stats(rows):
    """mean, std, quartiles over images of per-image rows (images x points)."""
    t = torch.tensor(rows, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
    return {"mean": t.mean(0).tolist(), "std": t.std(0, unbiased=False).tolist(), "q25": q[0].tolist(),
            "median": q[1].tolist(), "q75": q[2].tolist()}


def attack_records(dfn, args, x, y, idx, eot, trajectory=False, deltas=0):
    try:
        return pgd_eot(dfn, x, y, idx, args.eps, args.step_size, args.steps, eot, args.norm, trajectory=trajectory,
                       trajectory_deltas=deltas)
    except NonFiniteError as e:
        raise UserError(str(e)) from None


# ---------------------------------------------------------------- figures 2 and 6: settings

def find_runs(folders):
    found = []
    for f in folders:
        found += [os.path.dirname(p) for p in sorted(glob.glob(os.path.join(glob.escape(f), "**", "summary.json"),
                                                              recursive=True))]
    return sorted(set(found))


def model_label(a, labels):
    if a.get("defense") == "none":
        return "classifier"
    path = a.get(FAMILY_FLAGS.get(a.get("defense"), "ddpm")) or "?"
    norm = os.path.normpath(path)
    for key in (norm, os.path.abspath(norm)):
        if key in labels:
            return labels[key]
    for k, name in labels.items():
        if os.path.abspath(k) == os.path.abspath(norm):
            return name
    return "/".join(norm.split(os.sep)[-2:])


def settings(args):
    run = SimpleNamespace(d=SimpleNamespace(master=True, world=1, device="cpu"), t0=time.time())
    take_out(args)
    runs = find_runs(args.runs)
    require(runs, f"no attack.py run (a folder with summary.json) under {', '.join(args.runs)}")
    rows, seen = [], {}
    for r in runs:
        s = read_json(os.path.join(r, "summary.json"), "summary")
        a = s.get("args", {})
        require("robust_accuracy" in s and "setting" in a, f"{r}/summary.json is not an attack.py summary")
        numbers = [s.get(k) for k in ("n", "robust_accuracy", "clean_accuracy")] + list(s.get("robust_ci") or [])
        require(all(v is None or isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)
                and isinstance(s.get("n"), int) and s["n"] > 0,
                f"{r}/summary.json holds a number that is not finite (robust {s['robust_accuracy']}, n {s.get('n')}): "
                "no figure is drawn from it; attack again in a new folder")
        setting = a["setting"] + (f"-{a.get('semi_n')}" if a["setting"] == "dw-semi" else "")
        row = {"defense": a.get("defense"), "nfe": a.get("nfe"), "norm": a.get("norm"),
               "model": model_label(a, args.labels), "setting": setting, "attack": s.get("attack", "pgd"),
               "steps": a.get("steps"), "eot": a.get("eot"), "protocol": s.get("protocol", "single"), "n": s["n"],
               "clean_accuracy": s.get("clean_accuracy"), "robust_accuracy": s["robust_accuracy"],
               "robust_ci": s.get("robust_ci") or list(wilson_interval(s["robust_accuracy"] * s["n"] / 100, s["n"])),
               "clean_ci": s.get("clean_ci"), "run": r}
        key = (row["defense"], row["nfe"], row["norm"], row["model"], setting)
        require(key not in seen, f"two runs for {row['defense']} NFE {row['nfe']} {row['norm']} {row['model']} "
                                 f"{setting}: {seen.get(key)} and {r}; pass the run folders you mean, or --label "
                                 "to tell the models apart")
        seen[key] = r
        rows.append(row)
    order = {s: k for k, s in enumerate(SETTINGS)}
    rows.sort(key=lambda w: (str(w["defense"]), str(w["nfe"]), str(w["norm"]), w["model"],
                             order["dw-semi" if w["setting"].startswith("dw-semi") else w["setting"]], w["setting"]))
    print(f"settings: {len(rows)} runs")
    for w in rows:
        lo, hi = w["robust_ci"]
        print(f"  {w['defense']} NFE {w['nfe']} {w['norm']} {w['model']:>20} {w['setting']:>12}: robust "
              f"{w['robust_accuracy']:.2f} [{lo:.1f}, {hi:.1f}]  (n {w['n']})")
    return finish(run, args, {"rows": rows}, plot_settings)


# ---------------------------------------------------------------- figure 7: EoT similarity

def per_draw_gradients(dfn, x, y, idx, draws):
    """d loss / d x of each of `draws` purifications (draws, B, ...), the draws of
    eot_gradient(x, y, idx, step 0, eot) in the same order: their prefix sums are EoT-k gradients."""
    pipes = [(i, 0, d) for d in range(draws) for i in idx]
    _, _, grads = dfn.run(x.repeat(draws, 1, 1, 1), y.repeat(draws), pipes, ATTACK, grad=True, eot=draws)
    return grads.view(draws, len(idx), *x.shape[1:])


def eot_cosines(det, wb, x, y, idx, eots):
    """Per image and k: cosine of the white-box EoT-k gradient (the first k draws summed) with the dw-both
    gradient, of the raw gradients and of their signs (the l_inf step direction). Lists (B, len(eots))."""
    g_det, _, _ = det.eot_gradient(x, y, idx, 0, 1)
    grads = per_draw_gradients(wb, x, y, idx, max(eots))
    g, cos, sign_cos, k_done = torch.zeros_like(g_det), [], [], 0
    for k in eots:
        for j in range(k_done, k):  # summed in draw order, as eot_gradient sums
            g = g + grads[j]
        k_done = k
        cos.append(F.cosine_similarity(g.flatten(1), g_det.flatten(1), dim=1, eps=1e-30))
        sign_cos.append(F.cosine_similarity(g.sign().flatten(1), g_det.sign().flatten(1), dim=1, eps=1e-30))
    return torch.stack(cos, 1).tolist(), torch.stack(sign_cos, 1).tolist()


def runs_by_eot(folders):
    """{eot: summary row} of finished white-box attack.py runs."""
    out = {}
    for r in find_runs(folders):
        s = read_json(os.path.join(r, "summary.json"), "summary")
        a = s.get("args", {})
        if a.get("setting") != "white-box":
            continue
        require(a["eot"] not in out, f"--runs: two white-box runs with EoT {a['eot']}: {out.get(a['eot'], {}).get('run')} "
                                     f"and {r}")
        out[a["eot"]] = {"robust_accuracy": s["robust_accuracy"], "robust_ci": s.get("robust_ci"), "n": s["n"], "run": r}
    require(out, f"--runs: no finished white-box attack.py run under {', '.join(folders)}")
    return out


def eot_similarity(args):
    from_runs = runs_by_eot(args.runs) if args.runs else None
    run = setup(args)
    det, wb = defense(run, args, "dw-both"), defense(run, args, "white-box")
    attacks = not args.no_attack and from_runs is None
    per_image = len(run.idx)
    total = per_image * (1 + max(args.eots) + (args.steps * (sum(args.eots) + 1) if attacks else 0))
    progress = Progress(total, "eot-similarity", "gradients", enabled=run.d.master)
    cos, sign_cos, records = [], [], {k: [] for k in args.eots + ["dw-both"]}
    for x, y, idx in batches(run, args):
        c, sc = eot_cosines(det, wb, x, y, idx, args.eots)
        cos += c
        sign_cos += sc
        progress.update(len(idx) * (1 + max(args.eots)))
        if attacks:
            for k in args.eots:
                records[k] += attack_records(wb, args, x, y, idx, k)[1]
                progress.update(len(idx) * args.steps * k)
            records["dw-both"] += attack_records(det, args, x, y, idx, 1)[1]
            progress.update(len(idx) * args.steps)
    cos, sign_cos = gather(run.d, cos), gather(run.d, sign_cos)
    data = {"eots": args.eots, "n": len(cos), "cosine": {**stats(cos), "per_image": cos},
            "sign_cosine": {**stats(sign_cos), "per_image": sign_cos}}
    if attacks:
        rec = {k: gather(run.d, v) for k, v in records.items()}
        summ = {k: summarize_records(v) for k, v in rec.items()}
        data["robust"] = {"source": "attacked here", "robust_accuracy": [summ[k]["robust_accuracy"] for k in args.eots],
                          "robust_ci": [summ[k]["robust_ci"] for k in args.eots],
                          "dw_both_robust_accuracy": summ["dw-both"]["robust_accuracy"],
                          "clean_accuracy": summ[args.eots[0]]["clean_accuracy"]}
    elif from_runs:
        data["robust"] = {"source": "attack.py runs", "runs": {str(k): v for k, v in from_runs.items()},
                          "robust_accuracy": [from_runs.get(k, {}).get("robust_accuracy") for k in args.eots],
                          "robust_ci": [from_runs.get(k, {}).get("robust_ci") for k in args.eots]}
    if run.d.master:
        for k, m, s in zip(args.eots, data["cosine"]["mean"], data["sign_cosine"]["mean"]):
            acc = data.get("robust", {}).get("robust_accuracy", [None] * len(args.eots))[args.eots.index(k)]
            print(f"  EoT {k:>3}: cosine {m:.4f}  sign cosine {s:.4f}" + (f"  robust {acc:.2f}" if acc is not None else ""))
    return finish(run, args, data, plot_eot_similarity)


# ---------------------------------------------------------------- figure 8: dw-semi vs dw-both loss curves

def random_direction(idx, like, seed):
    """+-1 per element, keyed by (seed, image)."""
    keys = [sample_seed(seed, i, RANDOM_DIRECTION) for i in idx]
    return torch.where(keyed_normal(keys, 0, like.shape[1:], like.device) >= 0, 1.0, -1.0).to(like.dtype)


def semi_curves(both, semi, x, y, idx, ks, magnitude, eval_sets, seed, random_semi=False, on_point=None):
    """Per image (B, len(ks)) losses at clip(x + k sigma): {curve name: lists}. sigma = magnitude x the sign
    of the dw-both gradient, of the dw-semi gradient summed over all N sets, or of a random +-1 tensor."""
    n_sets = semi.semi_n
    g_both, _, _ = both.eot_gradient(x, y, idx, 0, 1)
    g_semi, _, _ = semi.eot_gradient(x, y, idx, 0, n_sets)
    curves = {"dw-both": (both, g_both.sign(), 1), "dw-semi": (semi, g_semi.sign(), eval_sets),
              "random (dw-both noise)": (both, random_direction(idx, x, seed), 1)}
    if random_semi:
        curves["random (dw-semi noise)"] = (semi, curves["random (dw-both noise)"][1], eval_sets)
    out = {}
    with torch.no_grad():
        for name, (dfn, direction, draws) in curves.items():
            points = [(x + k * magnitude * direction).clamp(0, 1) for k in ks]
            out[name] = losses_at(dfn, points, y, idx, draws, ATTACK).T.tolist()
            if on_point:
                on_point(len(idx) * draws * len(ks))
    return out


def semi_curve(args):
    run = setup(args)
    both, semi = defense(run, args, "dw-both"), defense(run, args, "dw-semi")
    ks = list(range(-args.k_max, args.k_max + 1))
    per_point = 2 + args.eval_sets * (1 + args.random_semi)
    progress = Progress(len(run.idx) * (1 + args.semi_n + len(ks) * per_point), "semi-curve", "purifications",
                        enabled=run.d.master)
    curves = {}
    for x, y, idx in batches(run, args):
        c = semi_curves(both, semi, x, y, idx, ks, args.magnitude, args.eval_sets, args.seed, args.random_semi,
                        progress.update)
        progress.update(len(idx) * (1 + args.semi_n))
        for name, rows in c.items():
            curves.setdefault(name, []).extend(rows)
    curves = {name: gather(run.d, rows) for name, rows in curves.items()}
    data = {"k": ks, "magnitude": args.magnitude, "semi_n": args.semi_n, "eval_sets": args.eval_sets,
            "n": len(curves["dw-both"]), "curves": {name: {**stats(rows), "per_image": rows} for name, rows in curves.items()},
            "clean_loss": {name: [r[args.k_max] for r in rows] for name, rows in curves.items()},
            "evaluation": "dw-both: CE under its fixed noise; dw-semi: mean CE over the first eval_sets of the N "
                          "noise sets; images clipped to [0, 1]"}
    if run.d.master:
        for name, c in data["curves"].items():
            print(f"  {name:>24}: loss at k = 0 {c['mean'][args.k_max]:.4f}, k = {args.k_max} {c['mean'][-1]:.4f}")
    return finish(run, args, data, plot_semi_curve)


# ---------------------------------------------------------------- figure 3: loss landscape

def attack_trajectories(dfn, args, x, y, idx, eot):
    """(deltas (B, steps + 1, ...) from the zero start, the attacker's loss (B, steps), records)."""
    traj = []
    _, records = attack_records(dfn, args, x, y, idx, eot, trajectory=traj, deltas=max(idx) + 1)
    deltas = torch.stack([t["delta"] for t in traj]).to(x.device)
    deltas = torch.cat([torch.zeros_like(deltas[:, :1]), deltas], 1)
    return deltas, [t["loss"] for t in traj], records


def run_trajectories(folder, idx, device):
    """The same from an attack.py run with --log-trajectory --trajectory-deltas N (N > every index here)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "trajectory-deltas-*.pt"))):
        t = torch.load(path, map_location="cpu", weights_only=True)
        found.update({int(i): d for i, d in zip(t["index"], t["deltas"])})
    records = attack.read_records(folder)
    missing = [i for i in idx if i not in found or i not in records or "trajectory" not in records[i]]
    require(not missing, f"{folder}: no saved trajectory for image(s) {missing[:5]} (run attack.py with "
                         f"--log-trajectory --trajectory-deltas {max(idx) + 1} and the same --n)")
    deltas = torch.stack([found[i] for i in idx]).to(device)
    deltas = torch.cat([torch.zeros_like(deltas[:, :1]), deltas], 1)
    return deltas, [records[i]["trajectory"]["loss"] for i in idx], [records[i] for i in idx]


def check_run(folder, setting):
    s = read_json(os.path.join(folder, "args.json"), "args")
    require(s.get("setting") == setting, f"{folder} is a {s.get('setting')} run; expected {setting} here")


def landscape_model(run, args, purifier, label, runs=None):
    """One model's plane, surface, trajectories and endpoints (see the `landscape` help)."""
    d = run.d
    det, wb = defense(run, args, "dw-both", purifier), defense(run, args, "white-box", purifier)
    surf = det if args.surface == "dw-both" else defense(run, args, "white-box", purifier)
    draws = 1 if args.surface == "dw-both" else args.surface_draws
    progress = Progress(len(run.idx) * (args.steps * (1 + args.eot) + draws * (args.grid ** 2 + 2 * args.steps + 4)),
                        f"landscape {label}", "purifications", enabled=d.master)
    # 1. both attacks (or the runs' trajectories); the batch is one vector for the plane
    parts = []
    for x, y, idx in batches(run, args):
        if runs:
            t_det, t_eot = run_trajectories(runs[0], idx, d.device), run_trajectories(runs[1], idx, d.device)
        else:
            t_det, t_eot = attack_trajectories(det, args, x, y, idx, 1), attack_trajectories(wb, args, x, y, idx, args.eot)
        progress.update(len(idx) * args.steps * (1 + args.eot))
        parts.append((x, y, idx, t_det, t_eot))
    steps = parts[0][3][0].shape[1] - 1 if parts else args.steps
    u_u, e_u = all_sum(d, [sum(float((p[3][0][:, -1] ** 2).sum()) for p in parts),
                           sum(float((p[4][0][:, -1] * p[3][0][:, -1]).sum()) for p in parts)]).tolist()
    require(u_u > 0, f"{label}: the dw-both attack did not move (zero final perturbation): no plane to draw")
    c = e_u / u_u  # white-box final = c u + v with v orthogonal to u
    v_v = float(all_sum(d, [sum(float(((p[4][0][:, -1] - c * p[3][0][:, -1]) ** 2).sum()) for p in parts)])[0])
    require(v_v > 0, f"{label}: the white-box perturbation is parallel to the dw-both one: no plane to draw")
    # 2. coordinates of every iterate: a = <d, u> / <u, u>, b = <d, v> / <v, v> over the whole batch
    def plane(p):
        u = p[3][0][:, -1].double()
        return u, p[4][0][:, -1].double() - c * u

    sums = torch.zeros(2, steps + 1, 2, dtype=torch.float64)
    for p in parts:
        u, v = plane(p)
        for a_i in range(2):
            dl = p[3 + a_i][0].double()
            sums[a_i, :, 0] += (dl * u[:, None]).flatten(2).sum((0, 2)).cpu()
            sums[a_i, :, 1] += (dl * v[:, None]).flatten(2).sum((0, 2)).cpu()
    sums = all_sum(d, sums)
    coord_a, coord_b = sums[..., 0] / u_u, sums[..., 1] / v_v
    off = torch.zeros(2, steps + 1, 2, dtype=torch.float64)  # |off-plane part|^2 and |delta|^2
    for p in parts:
        u, v = plane(p)
        for a_i in range(2):
            dl = p[3 + a_i][0].double()
            rest = dl - coord_a[a_i].to(dl.device).view(1, -1, 1, 1, 1) * u[:, None] \
                - coord_b[a_i].to(dl.device).view(1, -1, 1, 1, 1) * v[:, None]
            off[a_i, :, 0] += (rest ** 2).flatten(2).sum((0, 2)).cpu()
            off[a_i, :, 1] += (dl ** 2).flatten(2).sum((0, 2)).cpu()
    off = all_sum(d, off)
    resid = off[..., 0].sqrt() / off[..., 1].sqrt().clamp_min(1e-30)
    # 3. the grid around every point, evaluated with the surface's noise (the same draws everywhere)
    lo_a, hi_a = min(0.0, c, float(coord_a.min())), max(1.0, c, float(coord_a.max()))
    lo_b, hi_b = min(0.0, float(coord_b.min())), max(1.0, float(coord_b.max()))
    m_a, m_b = args.margin * (hi_a - lo_a), args.margin * (hi_b - lo_b)
    grid_a = torch.linspace(lo_a - m_a, hi_a + m_a, args.grid, dtype=torch.float64)
    grid_b = torch.linspace(lo_b - m_b, hi_b + m_b, args.grid, dtype=torch.float64)
    surface = torch.zeros(args.grid, args.grid, dtype=torch.float64)
    iterate_loss = torch.zeros(2, steps + 1, dtype=torch.float64)
    with torch.no_grad():
        for p in parts:
            x, y, idx, t_det, t_eot = p
            u, v = (w.to(x.dtype) for w in plane(p))
            for i, b in enumerate(grid_b.tolist()):
                row = [(x + a * u + b * v).clamp(0, 1) for a in grid_a.tolist()]
                surface[i] += losses_at(surf, row, y, idx, draws).sum(1).double().cpu()
                progress.update(len(idx) * draws * args.grid)
            for a_i, t in enumerate((t_det, t_eot)):  # the iterates themselves, the endpoints x + final delta
                its = [x + t[0][:, k] for k in range(steps + 1)]
                iterate_loss[a_i] += losses_at(surf, its, y, idx, draws).sum(1).double().cpu()
                progress.update(len(idx) * draws * (steps + 1))
    n_total = float(all_sum(d, [len(run.idx)])[0])
    surface, iterate_loss = all_sum(d, surface) / n_total, all_sum(d, iterate_loss) / n_total
    endpoint = iterate_loss[:, steps]
    records = {name: gather(d, [r for p in parts for r in p[3 + a_i][2]]) for a_i, name in enumerate(("dw-both", "white-box"))}
    attack_loss = {name: gather(d, [l for p in parts for l in p[3 + a_i][1]]) for a_i, name in enumerate(("dw-both", "white-box"))}
    traj = {}
    for a_i, name in enumerate(("dw-both", "white-box")):
        traj[name] = {"a": coord_a[a_i].tolist(), "b": coord_b[a_i].tolist(), "residual": resid[a_i].tolist(),
                      "loss": iterate_loss[a_i].tolist(),
                      "attack_loss": torch.tensor(attack_loss[name], dtype=torch.float64).mean(0).tolist(),
                      "robust_accuracy": summarize_records(records[name])["robust_accuracy"]}
    return {"label": label, "c": c, "u_norm": math.sqrt(u_u), "v_norm": math.sqrt(v_v), "grid_a": grid_a.tolist(),
            "grid_b": grid_b.tolist(), "surface": surface.tolist(), "trajectories": traj,
            "endpoints": {"dw-both": {"a": 1.0, "b": 0.0, "loss": float(endpoint[0])},
                          "white-box": {"a": c, "b": 1.0, "loss": float(endpoint[1])}},
            "clean_loss": float(iterate_loss[0, 0])}


def landscape(args):
    if args.runs:
        check_run(args.runs[0], "dw-both")
        check_run(args.runs[1], "white-box")
        if args.addt:
            check_run(args.runs[2], "dw-both")
            check_run(args.runs[3], "white-box")
    run = setup(args)
    models = [(args.labels[0], run.purifier, args.runs[:2] if args.runs else None)]
    if args.addt:
        second = prepare(args, load_diffusion_model(args.defense, args.addt), run.d.device)
        models.append((args.labels[1], build_purifier(args, second), args.runs[2:] if args.runs else None))
    results = [landscape_model(run, args, purifier, label, runs) for label, purifier, runs in models]
    if run.d.master:
        for r in results:
            e = r["endpoints"]
            print(f"  {r['label']}: loss clean {r['clean_loss']:.4f}, dw-both end {e['dw-both']['loss']:.4f}, "
                  f"white-box EoT end {e['white-box']['loss']:.4f} (at a = {r['c']:.3f}, b = 1)")
    data = {"n": args.n, "surface": args.surface, "surface_draws": 1 if args.surface == "dw-both" else args.surface_draws,
            "plane": "u = final dw-both perturbation, v = final white-box perturbation minus its projection on u "
                     "(the batch as one vector); a point (a, b) is clip(x + a u + b v); iterates are projected by "
                     "least squares, residual = |off-plane part| / |delta|",
            "models": results}
    return finish(run, args, data, plot_landscape)


# ---------------------------------------------------------------- figure 1: trajectories

ATTACKS = ("white-box", "white-box EoT", "dw-both")


def pca_2d(points):
    """(P, D) -> (P, 2) coordinates on the two leading principal axes, and their explained variance ratios."""
    centred = points - points.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s ** 2
    return centred @ vh[:2].T, (var[:2] / var.sum().clamp_min(1e-30)).tolist()


def trajectories(args):
    run = setup(args)
    det, wb = defense(run, args, "dw-both"), defense(run, args, "white-box")
    settings_ = {"white-box": (wb, 1), "white-box EoT": (wb, args.eot), "dw-both": (det, 1)}
    progress = Progress(len(run.idx) * (args.steps * (2 + args.eot) + 3 * (args.steps + 1) * args.loss_draws),
                        "trajectories", "purifications", enabled=run.d.master)
    images, records = [], {name: [] for name in ATTACKS}
    for x, y, idx in batches(run, args):
        per = {}
        for name, (dfn, eot) in settings_.items():
            deltas, attack_loss, recs = attack_trajectories(dfn, args, x, y, idx, eot)
            records[name] += recs
            with torch.no_grad():
                loss = losses_at(wb, [x + deltas[:, k] for k in range(deltas.shape[1])], y, idx, args.loss_draws).T
            per[name] = (deltas, attack_loss, loss)
            progress.update(len(idx) * (args.steps * eot + (args.steps + 1) * args.loss_draws))
        for b, i in enumerate(idx):
            pts = torch.cat([per[name][0][b].flatten(1) for name in ATTACKS]).double().cpu()
            xy, explained = pca_2d(pts)
            final_det = per["dw-both"][0][b, -1].flatten().double()
            entry = {"index": i, "label": int(y[b]), "explained_variance": explained, "attacks": {}}
            for a_i, name in enumerate(ATTACKS):
                deltas = per[name][0][b].flatten(1).double()
                path = (deltas[1:] - deltas[:-1]).norm(dim=1).sum()
                entry["attacks"][name] = {
                    "xy": xy[a_i * (args.steps + 1):(a_i + 1) * (args.steps + 1)].tolist(),
                    "loss": per[name][2][b].tolist(), "attack_loss": per[name][1][b],
                    "straightness": float(deltas[-1].norm() / path.clamp_min(1e-30)),
                    "cosine_with_dw_both": float(F.cosine_similarity(deltas[-1], final_det, dim=0, eps=1e-30))}
            images.append(entry)
    images = gather(run.d, images)
    records = {name: gather(run.d, r) for name, r in records.items()}
    summary = {}
    for name in ATTACKS:
        s = summarize_records(records[name])
        summary[name] = {"robust_accuracy": s["robust_accuracy"], "robust_ci": s["robust_ci"],
                         "final_loss": sum(e["attacks"][name]["loss"][-1] for e in images) / len(images),
                         "straightness": sum(e["attacks"][name]["straightness"] for e in images) / len(images),
                         "cosine_with_dw_both": sum(e["attacks"][name]["cosine_with_dw_both"] for e in images) / len(images)}
        if run.d.master:
            m = summary[name]
            print(f"  {name:>14}: final loss {m['final_loss']:.4f}, straightness {m['straightness']:.3f}, "
                  f"cosine with dw-both {m['cosine_with_dw_both']:.3f}, robust {m['robust_accuracy']:.2f}")
    data = {"n": len(images), "eot": args.eot, "loss_draws": args.loss_draws, "summary": summary, "images": images,
            "embedding": "PCA per image of the perturbations of its three trajectories (iterates 0..steps, the "
                         "zero start included); loss = mean CE over loss_draws fresh purifications (the same "
                         "draws at every point); attack_loss = the attacker's own loss at iterates 0..steps-1"}
    return finish(run, args, data, plot_trajectories)


# ---------------------------------------------------------------- figure 9: RBGM ranks

def row_ranks(t):
    """Rank 1..H*W of every element within its (image, channel) row, ties by position (as RBGM orders)."""
    rows = t.flatten(2)
    order = torch.argsort(rows, dim=2, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(2, order, torch.arange(1, rows.shape[2] + 1, device=t.device).expand_as(order))
    return ranks


def chi_square(counts):
    """Pearson's statistic against equal bins over the last dim, with df and the p-value
    (upper regularised gamma: P(chi2_df > stat))."""
    counts = counts.double()
    expected = counts.sum(-1, keepdim=True) / counts.shape[-1]
    stat = ((counts - expected) ** 2 / expected.clamp_min(1e-30)).sum(-1)
    df = counts.shape[-1] - 1
    return stat, df, torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2)


def rbgm_ranks(args):
    run = setup(args)
    d, model = run.d, run.model
    family_name = FAMILY_FLAGS[args.defense]
    family = train_addt.FAMILIES[family_name](d.device)
    model.train()
    train_addt.set_dropout(model, args.dropout)
    C, H, W = run.images.shape[1:]
    for r, c in args.pixels:
        require(1 <= r <= H and 1 <= c <= W, f"--pixels {r},{c} lies outside the {H}x{W} image (1-based)")
    flat = [(r - 1) * W + (c - 1) for r, c in args.pixels]
    n_batches = math.ceil(args.n / args.batch_size)
    lo_b, hi_b = shard(n_batches, d.rank, d.world)  # whole batches per process: a batch's draws are keyed by it
    counts = torch.zeros(C, H * W, args.bins, dtype=torch.float64)
    picked, permutations, kept = [], True, True
    progress = Progress((hi_b - lo_b) * args.batch_size, "rbgm-ranks", "img", enabled=d.master)
    amp = lambda: autocast(d.device, run.precision)  # noqa: E731
    cgpo_args = argparse.Namespace(perturb="rbgm", cgpo_iters=args.cgpo_iters, guidance=args.guidance)
    for b in range(lo_b, hi_b):
        idx = list(range(b * args.batch_size, min((b + 1) * args.batch_size, args.n)))
        x0 = 2 * to_float(run.images[idx].to(d.device)) - 1
        y = run.labels[idx].to(d.device)
        seed = sample_seed(args.seed, b)
        g_rng = torch.Generator(device=d.device).manual_seed(seed)
        torch.manual_seed(seed)  # dropout draws from the global generator
        t = family.sample_t(len(idx), g_rng)
        a, s = family.scales(t)
        lam = train_addt.lambda_t(a, s, args.lambda_unit, args.lambda_min, args.lambda_max)
        delta, _, g = train_addt.cgpo(family, model, run.classifier, x0, y, t, lam, cgpo_args, g_rng, amp)
        ranks = row_ranks(g)
        permutations &= bool((ranks.sort(2).values == torch.arange(1, H * W + 1, device=d.device)).all())
        kept &= bool((row_ranks(delta) == ranks).all())  # delta = RBGM(g) has g's ranks
        bins = ((ranks - 1) * args.bins // (H * W)).cpu()
        counts.scatter_add_(2, bins.permute(1, 2, 0), torch.ones(bins.permute(1, 2, 0).shape, dtype=torch.float64))
        picked += [{"index": i, "ranks": ranks[k][:, flat].tolist()} for k, i in enumerate(idx)]
        progress.update(len(idx))
    counts = all_sum(d, counts)
    picked = gather(d, picked)
    permutations, kept = (bool(v == 0) for v in all_sum(d, [float(not permutations), float(not kept)]))
    stat, df, p = chi_square(counts)
    channels = "RGB" if C == 3 else [str(k) for k in range(C)]
    hist = []
    for ch in range(C):
        for (r, c), f in zip(args.pixels, flat):
            hist.append({"channel": channels[ch], "pixel": [r, c], "counts": counts[ch, f].tolist(),
                         "chi2": float(stat[ch, f]), "df": df, "p_value": float(p[ch, f])})
    data = {"n": args.n, "row_length": H * W, "bins": args.bins, "family": family_name,
            "rows_are_permutations": permutations, "rbgm_keeps_ranks": kept, "histograms": hist,
            "all_pixels": {"chi2_mean": float(stat.mean()), "df": df, "fraction_p_below_0.05": float((p < 0.05).double().mean()),
                           "fraction_p_below_0.01": float((p < 0.01).double().mean()), "positions": C * H * W},
            "ranks": picked,
            "note": "ranks of the accumulated CGPO gradient g (before the last RBGM) within each image-channel row; "
                    "t, delta and the eps draws keyed per batch of --batch-size images, as in training"}
    if d.master:
        for h in hist:
            print(f"  {h['channel']} [{h['pixel'][0]},{h['pixel'][1]}]: chi2 {h['chi2']:.1f} (df {df}), p {h['p_value']:.3f}")
        print(f"  every position: {100 * data['all_pixels']['fraction_p_below_0.05']:.1f} % with p < 0.05 "
              f"(uniform ranks: about 5 %)")
    return finish(run, args, data, plot_rbgm_ranks)


# ---------------------------------------------------------------- plots (matplotlib only here)

def figure(ncols=1, nrows=1, size=(5, 4), **kw):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)
    return plt, fig, axes


def save(plt, fig, png):
    fig.tight_layout()
    tmp = f"{png}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, png)
    plt.close(fig)


def plot_settings(data, png):
    rows = data["rows"]
    panels = sorted({(str(r["defense"]), str(r["nfe"]), str(r["norm"])) for r in rows})
    plt, fig, axes = figure(len(panels), size=(5.5, 4))
    for ax, (defense_, nfe, norm) in zip(axes[0], panels):
        sub = [r for r in rows if (str(r["defense"]), str(r["nfe"]), str(r["norm"])) == (defense_, nfe, norm)]
        settings_ = list(dict.fromkeys(r["setting"] for r in sub))
        models = list(dict.fromkeys(r["model"] for r in sub))
        width = 0.8 / len(models)
        for m_i, m in enumerate(models):
            xs, ys, err = [], [], [[], []]
            for s_i, s in enumerate(settings_):
                for r in sub:
                    if r["model"] == m and r["setting"] == s:
                        xs.append(s_i + (m_i - (len(models) - 1) / 2) * width)
                        ys.append(r["robust_accuracy"])
                        err[0].append(r["robust_accuracy"] - r["robust_ci"][0])
                        err[1].append(r["robust_ci"][1] - r["robust_accuracy"])
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
        ax.set_xticks(range(len(settings_)), settings_)
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(f"DP_{defense_.upper()} NFE {nfe}, {norm}")
        ax.legend(fontsize=8)
    save(plt, fig, png)


def plot_eot_similarity(data, png):
    plt, fig, axes = figure(size=(6, 4))
    ax = axes[0][0]
    ks, c = data["eots"], data["cosine"]
    ax.plot(ks, c["mean"], "o-", color="tab:blue", label="cosine with dw-both gradient")
    ax.fill_between(ks, c["q25"], c["q75"], color="tab:blue", alpha=0.2)
    ax.plot(ks, data["sign_cosine"]["mean"], "s--", color="tab:cyan", label="cosine of signs")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("EoT draws")
    ax.set_ylabel("gradient similarity", color="tab:blue")
    ax.legend(loc="center left", fontsize=8)
    robust = data.get("robust")
    if robust and any(v is not None for v in robust["robust_accuracy"]):
        ax2 = ax.twinx()
        pts = [(k, v) for k, v in zip(ks, robust["robust_accuracy"]) if v is not None]
        ax2.plot(*zip(*pts), "o-", color="tab:red")
        ax2.set_ylabel("robust accuracy (%)", color="tab:red")
    ax.set_title(f"EoT vs deterministic gradient ({data['n']} images)")
    save(plt, fig, png)


def plot_semi_curve(data, png):
    plt, fig, axes = figure(size=(6, 4))
    ax = axes[0][0]
    for name, c in data["curves"].items():
        ax.plot(data["k"], c["mean"], label=name, linestyle="--" if name.startswith("random") else "-")
    ax.set_xlabel(f"k (x + k sigma, |sigma| = {data['magnitude'] * 255:g}/255)")
    ax.set_ylabel("loss (CE)")
    ax.legend(fontsize=8)
    ax.set_title(f"dw-both vs dw-semi-{data['semi_n']} ({data['n']} images)")
    save(plt, fig, png)


def plot_landscape(data, png):
    models = data["models"]
    plt, fig, axes = figure(len(models), size=(5.5, 4.5))
    names = {"dw-both": "dw-both", "white-box": f"white-box EoT{data['args'].get('eot', '')}"}
    for ax, m in zip(axes[0], models):
        cs = ax.contourf(m["grid_a"], m["grid_b"], m["surface"], levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="loss")
        for name, color in (("dw-both", "tab:red"), ("white-box", "white")):
            t = m["trajectories"][name]
            ax.plot(t["a"], t["b"], "o-", color=color, markersize=3,
                    label=f"{names[name]} (robust {t['robust_accuracy']:.1f} %)")
            e = m["endpoints"][name]
            ax.plot([e["a"]], [e["b"]], "*", color=color, markersize=12, markeredgecolor="black")
        ax.set_xlabel("u: dw-both direction")
        ax.set_ylabel("v: white-box EoT direction (orthogonal part)")
        ax.set_title(m["label"])
        ax.legend(fontsize=8, loc="lower right")
    save(plt, fig, png)


def plot_trajectories(data, png):
    images = data["images"][:data["args"].get("plot_images", 4)]
    plt, fig, axes = figure(len(images), size=(4.5, 4))
    colors = {"white-box": "tab:gray", "white-box EoT": "tab:blue", "dw-both": "tab:red"}
    lo = min(min(a["loss"]) for e in images for a in e["attacks"].values())
    hi = max(max(a["loss"]) for e in images for a in e["attacks"].values())
    for ax, e in zip(axes[0], images):
        for name, a in e["attacks"].items():
            xy = list(zip(*a["xy"]))
            ax.plot(*xy, "-", color=colors.get(name, "black"), linewidth=1, label=name)
            sc = ax.scatter(*xy, c=a["loss"], cmap="magma", vmin=lo, vmax=hi, s=14, zorder=3)
        ax.set_title(f"image {e['index']} (label {e['label']})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    fig.colorbar(sc, ax=list(axes[0]), label="loss")
    fig.savefig(png, dpi=130)  # tight_layout does not mix with a shared colorbar
    plt.close(fig)


def plot_rbgm_ranks(data, png):
    hist = data["histograms"]
    channels = list(dict.fromkeys(h["channel"] for h in hist))
    pixels = list(dict.fromkeys(tuple(h["pixel"]) for h in hist))
    plt, fig, axes = figure(len(pixels), len(channels), size=(3.5, 2.6))
    edges = [data["row_length"] * k / data["bins"] + 1 for k in range(data["bins"] + 1)]
    for h in hist:
        ax = axes[channels.index(h["channel"])][pixels.index(tuple(h["pixel"]))]
        ax.stairs(h["counts"], edges, fill=True, alpha=0.7)
        ax.axhline(sum(h["counts"]) / data["bins"], color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{h['channel']} [{h['pixel'][0]},{h['pixel'][1]}]  p = {h['p_value']:.2f}", fontsize=9)
        ax.set_xlabel("rank")
    save(plt, fig, png)


PLOTS = {"settings": plot_settings, "eot-similarity": plot_eot_similarity, "semi-curve": plot_semi_curve,
         "landscape": plot_landscape, "trajectories": plot_trajectories, "rbgm-ranks": plot_rbgm_ranks}


def replot(args):
    for path in args.json:
        data = read_json(path, "analysis JSON")
        require(isinstance(data, dict) and data.get("name") in PLOTS, f"{path} is not a JSON written by analyze.py")
        png = os.path.splitext(path)[0] + ".png"
        PLOTS[data["name"]](data, png)
        print(f"{path} -> {png}")


COMMANDS = {"settings": settings, "eot-similarity": eot_similarity, "semi-curve": semi_curve, "landscape": landscape,
            "trajectories": trajectories, "rbgm-ranks": rbgm_ranks, "plot": replot}


def main(argv=None):
    args = parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    run_main(main)
