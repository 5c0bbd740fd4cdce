"""Run (or resume) the matrix of attack.py runs (fid.py for table 7) behind one of the paper's tables, then write the table in
the paper's layout with the paper's number beside ours in every cell, e.g. "47.27 (ours 45.1 ± 3.0)".

    python tables.py --table 4 --ddpm DIR --addt-ddpm DIR --classifier CKPT --data cifar10 --out runs/table4
    python tables.py --table 4 ... --dry-run --bench runs/bench.json    # the commands and projected times only
    python tables.py --table 4 ... --nproc 4       # each cell under torchrun --nproc_per_node=4 (images sharded)
    python tables.py --table 4 ... --parallel 4    # 4 cells at once, one GPU each (CUDA_VISIBLE_DEVICES)
    python tables.py --table 4 ... --nfes 5 --norms linf --n 64 --steps 5 --eot 2     # a quick, smaller table
    python tables.py --table 3 --ddpm DIR --addt-ddpm DIR --edm PKL --addt-edm PTH \\
        --classifier WRN-28-10=wrn.pt --classifier VGG-16=vgg.pt --classifier ViT-B=vit/ ...

Tables (the paper's numbers live in paper_numbers.json, tables 1-13 as printed):
  1   DiffPure (--vpsde), GDMP (MSE), DP_DDPM, DP_DDIM (NFE 100): clean, PGD20-EoT1, PGD20-EoT10 (l_inf)
  2   DP_DDIM (NFE 100), GDMP (none, MSE, SSIM guidance), DP_DDPM, DiffPure, DP_EDM, vanilla vs ADDT
      (--addt-ddpm/--addt-vpsde/--addt-edm); GDMP runs on the vanilla --ddpm
  3   per classifier (--classifier NAME=CKPT, several): DP_DDPM-1000, DP_DDIM-100 (NFE 10), DP_EDM
  4   DP_DDPM NFE sweep (--nfes, default 5,10,20,50,100), vanilla vs ADDT, with the classifier-only row
  5   DP_DDIM NFE sweep, the same
  6   Tiny-ImageNet (--data tinyimagenet): DP_DDPM-1000, DP_DDIM-100 (NFE 10), vanilla vs ADDT, classifier row
  7   FID of the DDPM: vanilla, clean fine-tune, ADDT, ADDT_linf (fid.py; no --classifier; --fid-n, --inception)
  8   ablations at each NFE: vanilla fine-tune (--ft-ddpm) and MSE-guided (--mse-ddpm), DP_DDPM and DP_DDIM
  9   DP_EDM-SDE (S_churn 6) and -ODE (S_churn 0), vanilla vs ADDT
  10  DiffPure (--vpsde/--addt-vpsde) with and without the extra corrector (--corrector langevin)
  11  vanilla, ADDT and ADDT_linf (--linf-ddpm), DP_DDPM-1000 and DP_DDIM (NFE 100)
  12  AutoAttack rand (upstream and fixed) vs PGD20-EoT10, DiffPure, DP_DDPM, DP_DDIM (NFE 100)
  13  fixed AutoAttack, vanilla vs ADDT, DiffPure, DP_DDPM, DP_DDIM (NFE 100)
A family whose model flag is missing is left out (its cells show the paper's number only).

Each cell is one attack.py run in OUT/<cell>/ (clean accuracy from its clean evaluation: the l_inf run's,
or the l_2 run's); cells share names across tables, so one --out can hold several tables. A cell with a
summary.json is done and skipped (after checking it was run with the same flags); an unfinished one
continues with attack.py --resume, so the matrix survives kill -9 at any point. Table 7's cells are fid.py
runs (done when fid.json exists) sharing one --ref-stats file. Writes OUT/table<N>.md and
OUT/table<N>.json (every cell, its command, status and numbers) after every cell; logs in OUT/logs/.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from addt_attacks import wilson_interval
from addt_common import (UserError, check_out_dir, format_seconds, lock_out, parse_ints, read_json, require, run_main,
                         unlock_out, write_json, write_text)

REPO = os.path.dirname(os.path.abspath(__file__))
PAPER = os.path.join(REPO, "paper_numbers.json")
NORMS = ("linf", "l2")
NORM_TEXT = {"linf": "l_inf", "l2": "l_2"}
RUNNABLE = tuple(range(1, 14))
SCRIPTS = {"attack": "attack.py", "fid": "fid.py"}  # a cell is one run of one of them (table 7: fid.py)
DONE_FILE = {"attack": "summary.json", "fid": "fid.json"}
# model flags per family: label -> flag (the DDPM models serve DP_DDPM, DP_DDIM and GDMP)
MODEL_FLAGS = {"ddpm": {"vanilla": "ddpm", "addt": "addt_ddpm", "ft": "ft_ddpm", "mse": "mse_ddpm",
                        "addt-linf": "linf_ddpm"},
               "vpsde": {"vanilla": "vpsde", "addt": "addt_vpsde"}, "edm": {"vanilla": "edm", "addt": "addt_edm"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=int, required=True, help=f"one of {', '.join(map(str, RUNNABLE))}")
    g = p.add_argument_group("models (a family without its flag is left out)")
    g.add_argument("--ddpm", help="vanilla DDPM (diffusers folder): DP_DDPM, DP_DDIM and GDMP")
    g.add_argument("--addt-ddpm", help="ADDT fine-tuned DDPM (train_addt.py's OUT/ema)")
    g.add_argument("--ft-ddpm", help="table 8: DDPM fine-tuned without perturbation (--perturb none)")
    g.add_argument("--mse-ddpm", help="table 8: DDPM fine-tuned with MSE guidance (--guidance mse)")
    g.add_argument("--linf-ddpm", help="table 11: ADDT_linf (--perturb linf)")
    g.add_argument("--vpsde", help="DiffPure's score_sde checkpoint")
    g.add_argument("--addt-vpsde", help="ADDT fine-tuned VP-SDE")
    g.add_argument("--edm", help="EDM network (pickle or .pth)")
    g.add_argument("--addt-edm", help="ADDT fine-tuned EDM")
    g.add_argument("--classifier", action="append", default=None, metavar="[NAME=]CKPT",
                   help="classifier checkpoint; table 3 takes several, named as the paper's rows (VGG-16, "
                        "ResNet-50, WRN-28-10, WRN-70-16, ViT-B)")
    g.add_argument("--arch", default=None, help="classifier arch for a bare state dict (attack.py's --arch)")
    g.add_argument("--classifier-norm", default=None, help="attack.py's --classifier-norm")
    g.add_argument("--data", default="cifar10", help="data set name or path (attack.py's --data)")
    g.add_argument("--dataset", choices=["auto", "CIFAR-10", "CIFAR-100", "Tiny-ImageNet"], default="auto",
                   help="which of the paper's rows to compare with (auto: from the --data name)")
    s = p.add_argument_group("what to run")
    s.add_argument("--nfes", default=None, help="tables 4, 5, 8: NFEs, comma-separated (default 5,10,20,50,100)")
    s.add_argument("--norms", default="linf,l2", help="comma-separated: linf, l2")
    s.add_argument("--no-classifier-row", action="store_true", help="skip the classifier-only (-) row")
    a = p.add_argument_group("forwarded to every attack.py run")
    a.add_argument("--n", type=int, default=1024, help="first N test images (attack.py --num-images)")
    a.add_argument("--steps", type=int, default=None, help="attack iterations (default attack.py's: 20 PGD, 100 AA)")
    a.add_argument("--eot", type=int, default=None, help="EoT of every white-box cell without its own "
                   "(default attack.py's: 10 PGD, 20 AutoAttack)")
    a.add_argument("--aa-draws", type=int, default=None, help="fixed AutoAttack's evaluations per candidate")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--precision", default="fp32")
    a.add_argument("--device", default=None)
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--chunk", type=int, default=None)
    a.add_argument("--extra-args", default="", help="more attack.py flags for every cell, one quoted string: "
                   "--extra-args '--random-start --protocol worst-5' (or --extra-args='...')")
    f = p.add_argument_group("table 7 (FID: one fid.py run per model)")
    f.add_argument("--fid-n", type=int, default=None, help="images sampled per model (default fid.py's: 50,000)")
    f.add_argument("--inception", default=None, help="fid.py --inception (pytorch-fid's weight file)")
    f.add_argument("--ref-stats", default=None, help="the data set's Inception statistics, shared by the cells "
                   "(default OUT/fid-ref-stats.npz: computed once by the first cell)")
    r = p.add_argument_group("running")
    r.add_argument("--out", default=None, help="folder of the cells and the table (default runs/table<N>)")
    r.add_argument("--nproc", type=int, default=1, help="processes per cell (torchrun --standalone "
                   "--nproc_per_node): the cell's images are sharded over them")
    r.add_argument("--parallel", type=int, default=1, help="cells at once, each on its own --nproc GPUs "
                   "(CUDA_VISIBLE_DEVICES)")
    r.add_argument("--max-cells", type=int, default=None, help="run at most K cells now (then write the table)")
    r.add_argument("--dry-run", action="store_true", help="print the commands and projected times; run nothing")
    r.add_argument("--bench", default=None, help="bench.json (bench.py) for the projected times")
    r.add_argument("--report-only", action="store_true", help="write the table from finished cells; run nothing")
    return check_args(p.parse_args(join_extra_args(sys.argv[1:] if argv is None else list(argv))))


def join_extra_args(argv):
    """'--extra-args', '--random-start' -> '--extra-args=--random-start': argparse would read a value that
    starts with '-' as an option and say the flag has no argument."""
    out = []
    for k, a in enumerate(argv):
        if k and argv[k - 1] == "--extra-args" and out[-1] == "--extra-args":
            out[-1] = f"--extra-args={a}"
        else:
            out.append(a)
    return out


def check_args(args):
    """Every flag and every file checked before any cell runs."""
    require(args.table in RUNNABLE, f"--table {args.table}: the paper has tables 1-13")
    args.out = args.out or os.path.join("runs", f"table{args.table}")
    check_out_dir(args.out)
    args.norms = [s.strip() for s in args.norms.split(",") if s.strip()]
    require(args.norms and set(args.norms) <= set(NORMS), f"--norms takes linf and/or l2, not {args.norms}")
    args.nfes = parse_ints(args.nfes or "5,10,20,50,100", "--nfes")
    for name in ("n", "nproc", "parallel", "max_cells", "steps", "eot", "aa_draws", "batch_size", "chunk", "fid_n"):
        v = getattr(args, name)
        require(v is None or v >= 1, f"--{name.replace('_', '-')} must be positive, not {v}")
    require(args.seed >= 0, f"--seed must be non-negative, not {args.seed}")
    require(args.classifier or args.table == 7, "--classifier is required (every table but 7 attacks a classifier)")
    args.classifiers = parse_classifiers(args.classifier or [], args.table)
    args.ref_stats = os.path.abspath(args.ref_stats or os.path.join(args.out, "fid-ref-stats.npz"))
    if args.inception is not None:
        require(os.path.isfile(args.inception), f"--inception {args.inception} not found")
        args.inception = os.path.abspath(args.inception)
    for flags in MODEL_FLAGS.values():
        for flag in flags.values():
            path = getattr(args, flag)
            if path is not None:
                require(os.path.exists(path), f"--{flag.replace('_', '-')} {path} not found")
                setattr(args, flag, os.path.abspath(path))
    if not (args.data in ("cifar10", "cifar100", "tinyimagenet")):
        require(os.path.exists(args.data), f"--data {args.data} not found")
        args.data = os.path.abspath(args.data)
    if args.dataset == "auto":
        base = os.path.basename(args.data.rstrip("/")).lower()
        args.dataset = "Tiny-ImageNet" if "tiny" in base else "CIFAR-100" if "100" in base else "CIFAR-10"
    if args.bench:
        require(os.path.isfile(args.bench), f"--bench {args.bench} not found")
    try:
        args.extra = shlex.split(args.extra_args)
    except ValueError as e:
        raise UserError(f"--extra-args: {e}") from None
    require(not (args.dry_run and args.report_only), "--dry-run and --report-only exclude each other")
    return args


def short(name):
    """'WRN-28-10*' -> 'wrn2810': how classifier names are matched."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_classifiers(values, table):
    """[(name, absolute path)]: NAME=CKPT or CKPT (named WRN-28-10, the paper's classifier)."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or os.sep in name or os.path.exists(v):
            name, path = "WRN-28-10", v
        require(os.path.exists(path), f"--classifier {path} not found")
        out.append((name, os.path.abspath(path)))
    names = [short(n) for n, _ in out]
    require(len(set(names)) == len(names), f"--classifier: two classifiers named alike ({[n for n, _ in out]})")
    require(table == 3 or len(out) <= 1, "several --classifier are for table 3; the other tables take one")
    return out


# ---------------------------------------------------------------- the paper's numbers

def load_paper():
    with open(PAPER) as f:
        return json.load(f)["tables"]


def paper_value(paper, table, column, **key):
    """The printed number of `table` in the row whose key matches (nfe compared as printed, '*' dropped;
    classifier names by short()), or None."""
    t = paper[str(table)]
    j = t["columns"].index(column)
    for row in t["rows"]:
        k = row["key"]
        if all(short(str(k.get(f))) == short(str(v)) for f, v in key.items()):
            return row["values"][j]
    return None


# ---------------------------------------------------------------- the plan: cells and the table's layout

class Plan:
    """The cells (attack.py runs) of one table and its rows, each entry pointing at a cell's metric."""

    def __init__(self, args, paper):
        self.args, self.paper = args, paper
        self.cells, self.rows, self.left_out = {}, [], {}
        self.columns, self.row_header, self.notes = [], [], []

    def cell(self, family, model="vanilla", norm="linf", nfe=None, setting="white-box", eot=None, attack="pgd",
             classifier=None, churn=None, corrector=None, guidance=None):
        """The name of the cell (registered on first use), or None when its model or norm is not given."""
        args = self.args
        if norm not in args.norms:
            self.left_out.setdefault(f"--norms has no {norm}", set()).add(norm)
            return None
        clf_name, clf_path = classifier or args.classifiers[0]
        flags = {"defense": family, "norm": norm, "setting": setting, "classifier": clf_path}
        if family == "none":
            name = f"classifier-{norm}"
        else:
            base = "ddpm" if family in ("ddpm", "ddim", "gdmp") else family
            flag = MODEL_FLAGS[base][model]
            path = getattr(args, flag)
            if path is None:
                self.left_out.setdefault(f"no --{flag.replace('_', '-')}", set()).add(model)
                return None
            flags[base] = path
            name = f"{family}-{model}"
            if guidance is not None:
                flags["guidance"] = guidance
                name = f"{family}-{guidance}-{model}"
            if nfe is not None:
                flags["nfe"] = nfe
                name += f"-nfe{nfe}"
            if churn is not None:
                flags["s_churn"] = churn
                name += f"-churn{churn:g}"
            if corrector is not None:
                flags["corrector"] = corrector
                name += f"-{corrector}"
            name += f"-{norm}"
            if setting != "white-box":
                name += f"-{setting}"
            if eot is not None:
                flags["eot"] = eot
                name += f"-eot{eot}"
        if attack != "pgd":
            flags["attack"] = attack
            name += f"-{attack}"
        if short(clf_name) != "wrn2810":
            name += f"-{short(clf_name)}"
        old = self.cells.get(name)
        require(old is None or old == flags, f"internal: cell {name} planned twice with different flags")
        self.cells[name] = flags
        return name

    def fid_cell(self, model):
        """A fid.py run of a DDPM model (table 7), or None when its flag is not given."""
        flag = MODEL_FLAGS["ddpm"][model]
        path = getattr(self.args, flag)
        if path is None:
            self.left_out.setdefault(f"no --{flag.replace('_', '-')}", set()).add(model)
            return None
        self.cells[f"fid-{model}"] = {"script": "fid", "model": "ddpm", "ddpm": path}
        return f"fid-{model}"

    def entry(self, cell, metric, paper):
        return {"cell": cell, "metric": metric, "paper": paper}

    def triple(self, table, column_prefix, family, model, classifier=None, **cell_kw):
        """clean, l_inf and l_2 entries of one model (clean from the l_inf cell, else the l_2 one)."""
        key = cell_kw.pop("key")
        linf = self.cell(family, model, "linf", classifier=classifier, **cell_kw)
        l2 = self.cell(family, model, "l2", classifier=classifier, **cell_kw)
        col = lambda c: f"{column_prefix} {c}".strip()  # noqa: E731
        return [self.entry(linf or l2, "clean", paper_value(self.paper, table, col("clean"), **key)),
                self.entry(linf, "robust", paper_value(self.paper, table, col("linf"), **key)),
                self.entry(l2, "robust", paper_value(self.paper, table, col("l2"), **key))]


GDMP_GUIDANCE = {"GDMP (No Guided)": "none", "GDMP (MSE)": "mse", "GDMP (SSIM)": "ssim"}
GDMP_NOTE = ("GDMP with GDMP's CIFAR-10 settings (t* = 36 steps, 4 iterations, guide_scale 60000 MSE / 70000 SSIM "
             "for its batch of 100; README 'GDMP'), on the vanilla --ddpm; the ADDT authors' own GDMP settings "
             "are not public.")


def six_columns(a="Vanilla", b="Ours"):
    return [f"{m} {c}" for m in (a, b) for c in ("Clean", "l_inf", "l_2")]


def classifier_row(plan, table, labels, key, prefixes=("vanilla", "ours")):
    """The '-' row: the bare classifier (attack.py --defense none), the same numbers under each model."""
    if plan.args.no_classifier_row:
        return
    entries = []
    for prefix in prefixes:
        entries += plan.triple(table, prefix, "none", None, key=key)
    plan.rows.append({"labels": labels, "entries": entries})


def table_nfe(plan, table, family):
    """Tables 4 (DP_DDPM) and 5 (DP_DDIM): NFE sweep, vanilla vs ADDT."""
    ds = plan.args.dataset
    plan.row_header, plan.columns = ["Dataset", "NFE"], six_columns()
    default = {"ddpm": 100, "ddim": 10}[family]
    classifier_row(plan, table, [ds, "-"], {"dataset": ds, "nfe": "-"})
    for nfe in plan.args.nfes:
        entries = []
        for model, prefix in (("vanilla", "vanilla"), ("addt", "ours")):
            entries += plan.triple(table, prefix, family, model, nfe=nfe, key={"dataset": ds, "nfe": nfe})
        plan.rows.append({"labels": [ds, f"{nfe}{'*' if nfe == default else ''}"], "entries": entries})


def table_1(plan):
    plan.row_header, plan.columns = [""], ["DiffPure", "GDMP (MSE)", "DP_DDPM", "DP_DDIM"]
    methods = [("DiffPure", "vpsde", None, None), ("GDMP (MSE)", "gdmp", None, "mse"), ("DP_DDPM", "ddpm", 100, None),
               ("DP_DDIM", "ddim", 100, None)]
    for row, eot in (("clean", None), ("PGD20-EoT1", 1), ("PGD20-EoT10", None)):
        entries = []
        for col, family, nfe, guidance in methods:
            p = paper_value(plan.paper, 1, col, row=row)
            cell = plan.cell(family, "vanilla", "linf", nfe=nfe, eot=eot, guidance=guidance)
            entries.append(plan.entry(cell, "clean" if row == "clean" else "robust", p))
        plan.rows.append({"labels": [row], "entries": entries})
    plan.notes.append("DP_DDIM at NFE 100: the printed numbers equal table 5's NFE 100 row.")
    plan.notes.append(GDMP_NOTE)


def table_2(plan):
    plan.row_header, plan.columns = ["Diffusion model", "DBP model"], ["Clean", "l_inf", "l_2"]
    if not plan.args.no_classifier_row:
        key = {"diffusion": "-", "method": "classifier only"}
        plan.rows.append({"labels": ["-", "-"], "entries": plan.triple(2, "", "none", None, key=key)})
    rows = [("DDIM", "DP_DDIM", "ddim", 100, "vanilla"), ("DDIM", "DP_DDIM Ours", "ddim", 100, "addt"),
            ("DDPM", "GDMP (No Guided)", "gdmp", None, "vanilla"), ("DDPM", "GDMP (MSE)", "gdmp", None, "vanilla"),
            ("DDPM", "GDMP (SSIM)", "gdmp", None, "vanilla"), ("DDPM", "DP_DDPM", "ddpm", 100, "vanilla"),
            ("DDPM", "DP_DDPM Ours", "ddpm", 100, "addt"), ("DDPM++", "COUP", None, None, None),
            ("DDPM++", "DiffPure", "vpsde", None, "vanilla"), ("DDPM++", "DiffPure Ours", "vpsde", None, "addt"),
            ("EDM", "DP_EDM", "edm", None, "vanilla"), ("EDM", "DP_EDM Ours", "edm", None, "addt")]
    for diffusion, method, family, nfe, model in rows:
        key = {"diffusion": diffusion, "method": method}
        if family is None:
            entries = [plan.entry(None, m, paper_value(plan.paper, 2, c, **key))
                       for m, c in (("clean", "clean"), ("robust", "linf"), ("robust", "l2"))]
        else:
            guidance = GDMP_GUIDANCE.get(method) if family == "gdmp" else None
            entries = plan.triple(2, "", family, model, nfe=nfe, key=key, guidance=guidance)
        plan.rows.append({"labels": [diffusion, method], "entries": entries})
    plan.notes.append("COUP is not implemented here. DP_DDIM at NFE 100 (SPEC.md: n = 1000 in table 2).")
    plan.notes.append(GDMP_NOTE)


def table_3(plan):
    plan.row_header, plan.columns = ["Method", "Classifier"], six_columns()
    for method, family, nfe in (("DP_DDPM-1000", "ddpm", 100), ("DP_DDIM-100", "ddim", 10), ("DP_EDM", "edm", None)):
        for clf in plan.args.classifiers:
            key = {"method": method, "classifier": clf[0]}
            entries = []
            for model, prefix in (("vanilla", "vanilla"), ("addt", "ours")):
                entries += plan.triple(3, prefix, family, model, classifier=clf, nfe=nfe, key=key)
            plan.rows.append({"labels": [method, clf[0]], "entries": entries})
    plan.notes.append("DP_DDIM-100 is n = 100, NFE 10 (its WRN-28-10 row equals table 5's NFE 10 row).")


def table_6(plan):
    """Tiny-ImageNet: DP_DDPM-1000 (NFE 100) and DP_DDIM-100 (n = 100: NFE 10), vanilla vs ADDT, 64x64 models."""
    plan.row_header, plan.columns = ["Method"], six_columns()
    classifier_row(plan, 6, ["-"], {"method": "-"})
    for method, family, nfe in (("DP_DDPM-1000", "ddpm", 100), ("DP_DDIM-100", "ddim", 10)):
        entries = []
        for model, prefix in (("vanilla", "vanilla"), ("addt", "ours")):
            entries += plan.triple(6, prefix, family, model, nfe=nfe, key={"method": method})
        plan.rows.append({"labels": [method], "entries": entries})
    if plan.args.dataset != "Tiny-ImageNet":
        plan.notes.append(f"table 6 reports Tiny-ImageNet; these cells ran on {plan.args.dataset} "
                          "(pass --data tinyimagenet with Tiny-ImageNet models and classifier)")


def table_7(plan):
    """FID of the DDPM: vanilla, fine-tuned without perturbation, ADDT (RBGM) and ADDT_linf."""
    plan.row_header, plan.columns = [""], ["Vanilla", "Clean Fine-tune", "Ours", "Ours l_inf"]
    models = (("vanilla", "vanilla"), ("ft", "clean fine-tune"), ("addt", "ours"), ("addt-linf", "ours linf"))
    plan.rows.append({"labels": ["FID"], "entries": [plan.entry(plan.fid_cell(m), "fid", paper_value(
        plan.paper, 7, col, row="FID")) for m, col in models]})
    plan.notes.append("FID: fid.py with its defaults (DDPM's ancestral sampler over 1000 steps, 50,000 images, against "
                      "the CIFAR-10 training set's statistics, pytorch-fid's Inception weights); --fid-n for fewer.")


def table_8(plan):
    plan.row_header = ["Method", "NFE"]
    plan.columns = six_columns("Vanilla fine-tune only", "MSE distance guided")
    for method, family, default in (("DP_DDPM", "ddpm", 100), ("DP_DDIM", "ddim", 10)):
        for nfe in plan.args.nfes:
            key = {"method": method, "nfe": nfe}
            entries = plan.triple(8, "vanilla-ft", family, "ft", nfe=nfe, key=key)
            entries += plan.triple(8, "mse", family, "mse", nfe=nfe, key=key)
            plan.rows.append({"labels": [method, f"{nfe}{'*' if nfe == default else ''}"], "entries": entries})


def variant_rows(plan, table, family, variants):
    """Rows Clean, l_inf, l_2 with one column per variant (model, paper column, plan.cell keywords); the clean
    number from the l_inf cell, else the l_2 one."""
    for row, norm in (("clean", None), ("linf", "linf"), ("l2", "l2")):
        entries = []
        for model, col, kw in variants:
            cells = {nm: plan.cell(family, model, nm, **kw) for nm in NORMS}
            cell = cells[norm] if norm else (cells["linf"] or cells["l2"])
            entries.append(plan.entry(cell, "robust" if norm else "clean", paper_value(plan.paper, table, col, row=row)))
        plan.rows.append({"labels": [{"clean": "Clean", "linf": "l_inf", "l2": "l_2"}[row]], "entries": entries})


def table_9(plan):
    plan.row_header = ["Type"]
    plan.columns = ["Vanilla DP_EDM-SDE", "Vanilla DP_EDM-ODE", "Ours DP_EDM-SDE", "Ours DP_EDM-ODE"]
    variant_rows(plan, 9, "edm", [("vanilla", "vanilla EDM-SDE", {"churn": 6.0}),
                                  ("vanilla", "vanilla EDM-ODE", {"churn": 0.0}),
                                  ("addt", "ours EDM-SDE", {"churn": 6.0}), ("addt", "ours EDM-ODE", {"churn": 0.0})])


def table_10(plan):
    """DiffPure's VP-SDE with and without the extra Langevin corrector (appendix G), vanilla vs ADDT."""
    plan.row_header = ["Type"]
    plan.columns = ["Vanilla", "Extra Corrector", "ADDT", "ADDT + Extra Corrector"]
    langevin = {"corrector": "langevin"}
    variant_rows(plan, 10, "vpsde", [("vanilla", "vanilla", {}), ("vanilla", "extra corrector", langevin),
                                     ("addt", "ADDT", {}), ("addt", "ADDT + extra corrector", langevin)])
    plan.notes.append("Extra corrector: attack.py --corrector langevin (snr 0.16, one Langevin step before each "
                      "Euler step; 200 network calls per purification). Vanilla and ADDT equal table 2's DiffPure cells.")


def table_11(plan):
    ds = plan.args.dataset
    plan.row_header = ["Method", "Dataset"]
    plan.columns = [f"{m} {c}" for m in ("Vanilla", "ADDT", "ADDT_linf") for c in ("Clean", "l_inf", "l_2")]
    for method, family in (("DP_DDPM-1000", "ddpm"), ("DP_DDIM-100", "ddim")):
        key = {"method": method, "dataset": ds}
        entries = []
        for model, prefix in (("vanilla", "vanilla"), ("addt", "ADDT"), ("addt-linf", "ADDT-linf")):
            entries += plan.triple(11, prefix, family, model, nfe=100, key=key)
        plan.rows.append({"labels": [method, ds], "entries": entries})
    plan.notes.append("DP_DDIM-100 here at NFE 100: the printed numbers equal table 5's NFE 100 row.")


AA = {"AutoAttack": "autoattack-rand", "AutoAttack ours": "autoattack-rand-fixed", "PGD20-EoT10": "pgd"}
AA_METHODS = (("DiffPure", "vpsde", None), ("DP_DDPM-1000", "ddpm", 100), ("DP_DDIM-100", "ddim", 100))


def table_12(plan):
    plan.row_header = ["Method"]
    plan.columns = [f"{NORM_TEXT[n]} {a}" for n in NORMS for a in AA]
    for method, family, nfe in AA_METHODS:
        entries = []
        for norm in NORMS:
            for col, attack_ in AA.items():
                cell = plan.cell(family, "vanilla", norm, nfe=nfe, attack=attack_)
                metric = "robust" if attack_ == "pgd" else "autoattack"
                entries.append(plan.entry(cell, metric, paper_value(plan.paper, 12, f"{norm} {col}", method=method)))
        plan.rows.append({"labels": [method], "entries": entries})
    plan.notes.append("AutoAttack columns report AutoAttack's own number (summary autoattack_robust_accuracy: "
                      "upstream one-pass flags, or the fixed version's mean fraction).")


def table_13(plan):
    plan.row_header, plan.columns = ["Method"], six_columns()
    for method, family, nfe in AA_METHODS:
        name = method.split("-")[0]
        entries = []
        for model, prefix in (("vanilla", "vanilla"), ("addt", "ours")):
            cells = {nm: plan.cell(family, model, nm, nfe=nfe, attack="autoattack-rand-fixed") for nm in NORMS}
            entries += [plan.entry(cells["linf"] or cells["l2"], "clean",
                                   paper_value(plan.paper, 13, f"{prefix} clean", method=name)),
                        plan.entry(cells["linf"], "autoattack", paper_value(plan.paper, 13, f"{prefix} linf", method=name)),
                        plan.entry(cells["l2"], "autoattack", paper_value(plan.paper, 13, f"{prefix} l2", method=name))]
        plan.rows.append({"labels": [name], "entries": entries})


LAYOUTS = {1: table_1, 2: table_2, 3: table_3, 4: lambda p: table_nfe(p, 4, "ddpm"),
           5: lambda p: table_nfe(p, 5, "ddim"), 6: table_6, 7: table_7, 8: table_8, 9: table_9, 10: table_10, 11: table_11,
           12: table_12, 13: table_13}


def make_plan(args):
    plan = Plan(args, load_paper())
    if args.dataset != "CIFAR-10" and args.table not in (4, 5, 6, 11):
        plan.notes.append(f"table {args.table} reports CIFAR-10 only: the paper's numbers are compared as printed")
    LAYOUTS[args.table](plan)
    require(plan.cells, f"table {args.table}: nothing to run ({'; '.join(sorted(plan.left_out)) or 'no cells'})")
    return plan


# ---------------------------------------------------------------- commands

def cell_argv(args, flags, out):
    """attack.py's (or fid.py's) flags of a cell: its own, then the forwarded ones."""
    argv = []
    for k, v in flags.items():
        if k != "script":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    if flags.get("script") == "fid":
        argv += ["--data", args.data, "--seed", str(args.seed), "--precision", args.precision, "--out", out,
                 "--ref-stats", args.ref_stats]
        for k, flag in (("fid_n", "--num-images"), ("inception", "--inception"), ("device", "--device")):
            argv += [flag, str(getattr(args, k))] if getattr(args, k) is not None else []
        return argv
    argv += ["--data", args.data, "--num-images", str(args.n), "--seed", str(args.seed),
             "--precision", args.precision, "--out", out]
    for k in ("arch", "classifier_norm", "device", "batch_size", "chunk", "steps"):
        if getattr(args, k) is not None:
            argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.eot is not None and flags.get("defense") != "none" and flags["setting"] == "white-box" and "eot" not in flags:
        argv += ["--eot", str(args.eot)]
    if args.aa_draws is not None and flags.get("attack") == "autoattack-rand-fixed":
        argv += ["--aa-draws", str(args.aa_draws)]
    return argv + args.extra


def command(args, argv, script="attack"):
    script = os.path.join(REPO, SCRIPTS[script])
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                script, *argv]
    return [sys.executable, script, *argv]


def resolve(name, argv, script="attack"):
    """attack.py's (fid.py's) resolved flags for a cell (its parse_args: every flag checked, no file read)."""
    import attack
    import fid
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return {"attack": attack, "fid": fid}[script].parse_args(argv)
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        raise UserError(f"cell {name}: {SCRIPTS[script]} refuses its flags: {lines[-1] if lines else '?'}") from None
    except UserError as e:
        raise UserError(f"cell {name}: {SCRIPTS[script]} refuses its flags: {e}") from None


def script_of(flags):
    return flags.get("script", "attack")


def cell_status(args, name):
    out = os.path.join(args.out, name)
    if os.path.isfile(os.path.join(out, DONE_FILE[script_of(args.plan.cells[name])])):
        return "done"
    return "started" if os.path.exists(os.path.join(out, "args.json")) else "pending"


# ---------------------------------------------------------------- projected times from bench.json

def model_calls(flags):
    family = flags.get("defense")
    if family in ("ddpm", "ddim"):
        return flags.get("nfe", {"ddpm": 100, "ddim": 10}[family]) + 1
    if family == "vpsde":  # --corrector langevin: corrector_steps more calls per Euler step
        corrector = flags.get("corrector_steps", 1) if flags.get("corrector") == "langevin" else 0
        return flags.get("nfe", 100) * (1 + corrector)
    if family == "edm":
        return 2 * flags.get("edm_steps", 50) - 1
    if family == "gdmp":
        return flags.get("gdmp_iters", 4) * round(flags.get("t_star", 0.036) * 1000)
    return 0


def bench_rates(bench, path="default"):
    """{family: (s per gradient pipeline per network call, s per evaluation per call)} from bench.json's row
    `path` (bench.py's "default" is attack.py's defaults, "fast" its --fast; "ours" in older files)."""
    rates = {}
    for family, section in (("ddpm", "attack"), ("vpsde", "vpsde"), ("edm", "edm")):
        s = bench.get(section)
        if not s:
            continue
        ours = [r for r in s["rows"] if r.get("path") in (path, "ours") and r.get("pipelines/s")]
        if not ours:
            continue
        r, calls = ours[0], s["model_calls"]
        grad = 1 / r["pipelines/s"] / calls
        if r.get("eval pipelines/s"):
            ev = 1 / r["eval pipelines/s"] / calls
        elif "eval s" in r:
            ev = r["eval s"] / (s["images"] * calls)
        else:  # not timed (compiled rows of the GPU check): an evaluation costs about a third of a gradient
            ev = grad / 3
        rates[family] = (grad, ev)
    if "ddpm" in rates:  # the same UNet calls (GDMP's guidance is a few convolutions beside each)
        rates["ddim"] = rates["gdmp"] = rates["ddpm"]
    return rates


def projected_seconds(args, flags, rates):
    if script_of(flags) == "fid":  # sampling: forward passes only, at the evaluation rate (Inception not counted)
        return (args.fid_n or 50000) * 1000 * rates["ddpm"][1] / args.nproc if "ddpm" in rates else None
    family = flags.get("defense")
    if family == "none":
        return 0.0
    if family not in rates:
        return None
    grad, ev = rates[family]
    attack_ = flags.get("attack", "pgd")
    aa = attack_.startswith("autoattack")
    steps = args.steps or (100 if aa else 20)
    eot = flags.get("eot") or args.eot or (20 if aa else (10 if flags["setting"] == "white-box" else 1))
    pipelines = (2 * (steps + 1) if aa else steps) * eot
    evals = 2 + (3 * (args.aa_draws or 20) if attack_ == "autoattack-rand-fixed" else 0)
    calls = model_calls(flags)
    return args.n * calls * (pipelines * grad + evals * ev) / args.nproc


# ---------------------------------------------------------------- running cells

def die_with_parent():
    """A cell's process gets SIGTERM when tables.py dies (kill -9 included; Linux), so no orphan keeps
    writing into a cell a resumed tables.py will continue."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def visible_gpus():
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch
        return [str(k) for k in range(torch.cuda.device_count())]
    except ImportError:
        return []


def run_cell(args, name, cmd, gpus, lock):
    """One cell as a subprocess, its output into OUT/logs/NAME.log and (prefixed) onto stdout. Returns
    (exit status, last error line)."""
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    last_error = ""
    with open(os.path.join(args.out, "logs", f"{name}.log"), "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=die_with_parent, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("error:") or "Error" in line:
                last_error = line.strip()
            with lock:
                print(f"[{name}] {line}", end="", flush=True)
        rc = proc.wait()
    return rc, last_error


def run_cells(args, todo, commands):
    """Run the cells in `todo`, --parallel at a time; stop starting new ones after a failure."""
    lock, failures, done = threading.Lock(), [], []
    gpus = visible_gpus()
    slots = list(range(args.parallel))
    queue = list(todo)

    def worker(slot):
        my_gpus = gpus[slot * args.nproc:(slot + 1) * args.nproc] if args.parallel > 1 else []
        while True:
            with lock:
                if not queue or failures:
                    return
                name = queue.pop(0)
                print(f"cell {name}: {shlex.join(commands[name])}", flush=True)
            t0 = time.time()
            rc, err = run_cell(args, name, commands[name], my_gpus, lock)
            with lock:
                if rc != 0 or cell_status(args, name) != "done":  # torchrun exits 0 on a flag error (README)
                    failures.append((name, rc, err or f"exit {rc} without {DONE_FILE[script_of(args.plan.cells[name])]}"))
                else:
                    done.append(name)
                    print(f"cell {name}: finished in {format_seconds(time.time() - t0)} "
                          f"({len(done)}/{len(todo)})", flush=True)
                    write_report(args, args.plan, quiet=True)

    if args.parallel > 1:
        require(len(gpus) >= args.parallel * args.nproc or not gpus,
                f"--parallel {args.parallel} x --nproc {args.nproc} needs {args.parallel * args.nproc} GPUs; "
                f"{len(gpus)} visible")
    threads = [threading.Thread(target=worker, args=(s,)) for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


# ---------------------------------------------------------------- the table

def metric_of(summary, metric):
    """(value, [lo, hi] or None, n) of a finished cell."""
    n = summary["n"]
    if metric == "fid":
        return summary["fid"], None, n
    key = {"clean": "clean_accuracy", "robust": "robust_accuracy", "autoattack": "autoattack_robust_accuracy"}[metric]
    if key not in summary:  # a PGD cell asked for AutoAttack's number: it is its robust accuracy
        key = "robust_accuracy"
    ci_key = {"clean_accuracy": "clean_ci", "robust_accuracy": "robust_ci",
              "autoattack_robust_accuracy": "autoattack_robust_ci"}[key]
    value = summary[key]
    ci = summary.get(ci_key) or list(wilson_interval(value * n / 100, n))
    return value, ci, n


def fmt_paper(v, metric=None):
    return "–" if v is None else f"{v:.3f}" if metric == "fid" else f"{v:.2f}"


def cell_text(e):
    paper = fmt_paper(e["paper"], e["metric"])
    if e.get("ours") is None:
        return paper + ("" if e["status"] in ("not run", "n/a") else f" (ours: {e['status']})")
    if e["ci"] is None:
        return f"{paper} (ours {e['ours']:.3f})"
    lo, hi = e["ci"]
    return f"{paper} (ours {e['ours']:.1f} ± {(hi - lo) / 2:.1f})"


def write_report(args, plan, quiet=False):
    """OUT/table<N>.json and .md from the finished cells."""
    summaries, status = {}, {}
    for name in plan.cells:
        status[name] = cell_status(args, name)
        if status[name] == "done":
            summaries[name] = read_json(os.path.join(args.out, name, DONE_FILE[script_of(plan.cells[name])]), "summary")
    rows = []
    for row in plan.rows:
        entries = []
        for col, e in zip(plan.columns, row["entries"]):
            out = {"column": col, "paper": e["paper"], "cell": e["cell"], "metric": e["metric"], "ours": None,
                   "ci": None, "n": None, "status": "not run" if e["cell"] is None else status[e["cell"]]}
            if e["cell"] in summaries:
                out["ours"], out["ci"], out["n"] = metric_of(summaries[e["cell"]], e["metric"])
            entries.append(out)
        rows.append({"labels": row["labels"], "entries": entries})
    paper = load_paper()[str(args.table)]
    header = plan.row_header + plan.columns
    lines = [f"# Table {args.table}", "", paper["caption"], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(list(r["labels"]) + [cell_text(e) for e in r["entries"]]) + " |" for r in rows]
    n_done = sum(s == "done" for s in status.values())
    what = (f"the FID of {args.fid_n or 50000} samples" if args.table == 7 else
            f"± half the Wilson 95 % interval, over {args.n} images")
    lines += ["", f"Each cell: the paper's number (ours: this run's, {what}). Cells finished: {n_done}/{len(status)}."]
    lines += [f"Left out: {reason}." for reason in sorted(plan.left_out)] + plan.notes
    settings = {k: getattr(args, k) for k in ("n", "steps", "eot", "seed", "precision", "data", "dataset")}
    lines.append("Forwarded settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None) + ".")
    write_text(os.path.join(args.out, f"table{args.table}.md"), "\n".join(lines) + "\n")
    cells = {name: {"command": shlex.join(args.commands[name]), "status": status[name],
                    **({k: summaries[name].get(k) for k in ("n", "clean_accuracy", "clean_ci", "robust_accuracy",
                                                            "robust_ci", "autoattack_robust_accuracy", "seconds", "fid")
                        if k in summaries[name]}
                       if name in summaries else {})} for name in plan.cells}
    write_json(os.path.join(args.out, f"table{args.table}.json"),
               {"table": args.table, "caption": paper["caption"], "row_header": plan.row_header,
                "columns": plan.columns, "rows": rows, "cells": cells, "left_out": sorted(plan.left_out),
                "notes": plan.notes, "settings": settings})
    if not quiet:
        print("\n".join(lines))


# ---------------------------------------------------------------- main

def main(argv=None):
    import attack  # its flag checks decide every cell (fid.py's for table 7)
    import fid
    args = parse_args(argv)
    plan = make_plan(args)
    args.plan = plan
    args.commands, resolved = {}, {}
    for name, flags in plan.cells.items():
        argv_ = cell_argv(args, flags, os.path.join(args.out, name))
        resolved[name] = resolve(name, argv_, script_of(flags))
        args.commands[name] = command(args, argv_ + ["--resume"], script_of(flags))
    status = {name: cell_status(args, name) for name in plan.cells}
    for name in plan.cells:  # a finished cell must have been run with the flags it would get now
        if status[name] == "done":
            script = script_of(plan.cells[name])
            s = read_json(os.path.join(args.out, name, DONE_FILE[script]), "summary")
            changed = (attack.changed_flags(resolved[name], s.get("args", {})) if script == "attack" else
                       [k for k in fid.SAMPLE_FLAGS if s.get("args", {}).get(k) != getattr(resolved[name], k)])
            require(not changed, f"cell {name} in {args.out} was run with other settings "
                                 f"({', '.join('--' + k.replace('_', '-') for k in changed)}); remove "
                                 f"{os.path.join(args.out, name)} to redo it, or use another --out")
    todo = [n for n in plan.cells if status[n] != "done"]
    if plan.left_out:
        print(f"table {args.table}: left out ({'; '.join(sorted(plan.left_out))})")
    print(f"table {args.table}: {len(plan.cells)} cells, {len(plan.cells) - len(todo)} done, {len(todo)} to run")
    if args.dry_run:
        return dry_run(args, plan, status)
    lock_out(args.out)
    if args.report_only:
        todo = []
    if args.max_cells is not None:
        todo = todo[:args.max_cells]
    failures = run_cells(args, todo, args.commands) if todo else []
    write_report(args, plan)
    unlock_out(args.out)
    if failures:
        name, rc, err = failures[0]
        raise UserError(f"cell {name} failed (exit {rc}{': ' + err if err else ''}); log in "
                        f"{os.path.join(args.out, 'logs', name + '.log')}; rerun the same command to resume")
    return plan


def dry_run(args, plan, status):
    rates = {}
    if args.bench:
        bench = read_json(args.bench, "bench")
        rates = bench_rates(bench, "fast" if "--fast" in args.extra else "default")
        print(f"projected times from {args.bench} ({bench.get('device', '?')}, "
              f"{'small' if bench.get('settings', {}).get('small') else 'full'} size)")
    else:
        print("no bench figures (pass --bench runs/bench.json from bench.py for projected times)")
    total = 0.0
    for name in plan.cells:
        if status[name] == "done":
            print(f"[done] {name}")
            continue
        secs = projected_seconds(args, plan.cells[name], rates) if rates else None
        total += secs or 0.0
        when = "" if secs is None else f"  # ~{format_seconds(secs)}"
        print(f"[{status[name]}] {shlex.join(args.commands[name])}{when}")
    if rates:
        cells = len([n for n in plan.cells if status[n] != "done"])
        print(f"projected: {format_seconds(total)} for {cells} cells with --nproc {args.nproc}"
              + (f", about {format_seconds(total / args.parallel)} with --parallel {args.parallel}"
                 if args.parallel > 1 else ""))
    return plan


if __name__ == "__main__":
    run_main(main)
