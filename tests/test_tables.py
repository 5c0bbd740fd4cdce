"""tables.py: the paper's numbers against the paper's text, every table's cells accepted by attack.py,
--dry-run, a small table run end to end on the smoke models, and resuming an interrupted matrix."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import tables
from addt_common import UserError, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_MD = os.path.join(os.path.dirname(REPO), "shared", "paper", "addt-paper.md")
NUMBER = re.compile(r"^(?:<b>)?(\d+\.\d+)(?:</b>)?\*?$")


def printed_rows(text, n):
    """The decimal numbers of each row of table n as printed (tab-separated lines after its caption)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"Table {n}:"))
    rows, seen = [], False
    for ln in lines[start + 1:]:
        if "\t" in ln:
            seen = True
            nums = [float(m.group(1)) for c in ln.split("\t") for m in [NUMBER.match(c.strip())] if m]
            if nums:
                rows.append(nums)
        elif seen and not ln.strip():
            break
    return rows


def test_paper_numbers_match_the_paper():
    if not os.path.exists(PAPER_MD):
        pytest.fail(f"{PAPER_MD} is missing: the paper must lie beside the repository (../shared)")
    text = open(PAPER_MD).read()
    paper = tables.load_paper()
    assert sorted(paper, key=int) == [str(n) for n in range(1, 14)]
    for n, t in paper.items():
        ours = [[v for v in r["values"] if v is not None] for r in t["rows"]]
        assert ours == printed_rows(text, int(n)), f"table {n}"
        assert all(len(r["values"]) == len(t["columns"]) for r in t["rows"]), f"table {n}"


def test_paper_value_lookups():
    paper = tables.load_paper()
    # spot checks typed from the paper
    assert tables.paper_value(paper, 4, "vanilla linf", dataset="CIFAR-10", nfe=5) == 21.78
    assert tables.paper_value(paper, 4, "ours clean", dataset="CIFAR-100", nfe=100) == 59.18
    assert tables.paper_value(paper, 4, "vanilla l2", dataset="CIFAR-10", nfe="-") == 1.46
    assert tables.paper_value(paper, 5, "ours linf", dataset="CIFAR-10", nfe=10) == 47.85
    assert tables.paper_value(paper, 2, "linf", diffusion="DDPM", method="DP_DDPM Ours") == 51.46
    assert tables.paper_value(paper, 3, "ours linf", method="DP_EDM", classifier="WRN-70-16") == 69.63
    assert tables.paper_value(paper, 3, "vanilla clean", method="DP_DDIM-100", classifier="wrn-28-10") == 88.96
    assert tables.paper_value(paper, 8, "mse l2", method="DP_DDIM", nfe=100) == 68.36
    assert tables.paper_value(paper, 12, "l2 AutoAttack", method="DP_DDIM-100") == 77.15
    assert tables.paper_value(paper, 7, "ours linf", row="FID") == 13.608
    assert tables.paper_value(paper, 4, "vanilla linf", dataset="CIFAR-10", nfe=7) is None


@pytest.fixture
def fake_models(tmp_path):
    """Existing paths for every model flag (nothing is loaded by the planning)."""
    paths = {}
    for flag in ("ddpm", "addt-ddpm", "ft-ddpm", "mse-ddpm", "linf-ddpm", "vpsde", "addt-vpsde", "edm", "addt-edm",
                 "clf", "data"):
        paths[flag] = str(tmp_path / flag)
        os.makedirs(paths[flag])
    paths["inception"] = str(tmp_path / "inception.pth")  # fid.py checks that it exists before anything runs
    open(paths["inception"], "w").close()
    return paths


def every_model(paths):
    return [x for flag in ("ddpm", "addt-ddpm", "ft-ddpm", "mse-ddpm", "linf-ddpm", "vpsde", "addt-vpsde", "edm",
                           "addt-edm") for x in (f"--{flag}", paths[flag])]


@pytest.mark.parametrize("table", tables.RUNNABLE)
def test_every_table_plans_cells_attack_py_accepts(table, fake_models, tmp_path):
    p = fake_models
    clf = ["--classifier", p["clf"]] if table != 3 else [
        x for name in ("VGG-16", "WRN-28-10", "ViT-B") for x in ("--classifier", f"{name}={p['clf']}")]
    args = tables.parse_args(["--table", str(table), *every_model(p), *clf, "--data", p["data"], "--out",
                              str(tmp_path / "t"), "--device", "cpu", "--inception", p["inception"]])
    plan = tables.make_plan(args)
    paper = tables.load_paper()[str(table)]
    printed = sorted(v for r in paper["rows"] if r["key"].get("dataset", "CIFAR-10") == "CIFAR-10"
                     for v in r["values"] if v is not None)
    shown = [e for r in plan.rows for e in r["entries"]]
    assert all(len(r["entries"]) == len(plan.columns) for r in plan.rows)
    if table != 3:  # every printed CIFAR-10 number appears once (table 3: the named classifiers' rows only)
        assert sorted(e["paper"] for e in shown if e["paper"] is not None) == printed
    else:
        assert len(plan.rows) == 9  # DP_EDM is printed for WRN-28-10 and WRN-70-16 only
        for r in plan.rows:
            printed = r["labels"][0] != "DP_EDM" or r["labels"][1] == "WRN-28-10"
            assert all((e["paper"] is not None) == printed for e in r["entries"]), r["labels"]
    for name, flags in plan.cells.items():  # attack.py's (fid.py's) own parser accepts every cell
        ns = tables.resolve(name, tables.cell_argv(args, flags, str(tmp_path / "t" / name)), tables.script_of(flags))
        if tables.script_of(flags) == "fid":
            assert ns.model == "ddpm" and ns.model_path == flags["ddpm"] and ns.ref_stats == args.ref_stats
        else:
            assert ns.defense == flags["defense"] and ns.norm == flags["norm"]
    assert all(e["cell"] in plan.cells for e in shown if e["cell"] is not None)


def test_missing_models_are_left_out_and_flags_checked(fake_models, tmp_path):
    p = fake_models
    base = ["--classifier", p["clf"], "--data", p["data"], "--out", str(tmp_path / "t")]
    args = tables.parse_args(["--table", "2", "--ddpm", p["ddpm"], *base])
    plan = tables.make_plan(args)
    assert set(plan.left_out) == {"no --addt-ddpm", "no --vpsde", "no --addt-vpsde", "no --edm", "no --addt-edm"}
    assert all(f["defense"] in ("none", "ddpm", "ddim", "gdmp") for f in plan.cells.values())
    for argv, match in ((["--table", "14"], "1-13"),
                        (["--table", "4", "--norms", "l3"], "--norms"), (["--table", "4", "--nfes", "5,x"], "--nfes"),
                        (["--table", "4", "--ddpm", str(tmp_path / "nope")], "not found"),
                        (["--table", "4", "--classifier", f"VGG-16={p['clf']}"], "several --classifier")):
        with pytest.raises(UserError, match=match):
            tables.make_plan(tables.parse_args(argv + base))
    with pytest.raises(UserError, match="nothing to run"):
        tables.make_plan(tables.parse_args(["--table", "9", *base]))
    with pytest.raises(UserError, match="--classifier is required"):
        tables.parse_args(["--table", "4", "--ddpm", p["ddpm"], "--data", p["data"], "--out", str(tmp_path / "t")])
    with pytest.raises(UserError, match="attack.py refuses"):  # attack.py's own checks, before anything runs
        tables.main(["--table", "4", "--ddpm", p["ddpm"], *base, "--nfes", "3"])


def test_gdmp_cells_of_tables_1_and_2(fake_models, tmp_path, capsys):
    """GDMP's rows: the vanilla DDPM with --guidance none / mse / ssim, the paper's number beside each; table 1's
    GDMP (MSE) column with its EoT1 and EoT10 cells; --dry-run lists them."""
    p = fake_models
    base = ["--ddpm", p["ddpm"], "--classifier", p["clf"], "--data", p["data"], "--device", "cpu"]
    plan = tables.make_plan(tables.parse_args(["--table", "2", *base, "--out", str(tmp_path / "t2")]))
    rows = {r["labels"][1]: r["entries"] for r in plan.rows}
    for method, guidance, paper in (("GDMP (No Guided)", "none", [91.41, 40.82, 69.63]),
                                    ("GDMP (MSE)", "mse", [91.8, 40.97, 70.02]),
                                    ("GDMP (SSIM)", "ssim", [92.19, 38.18, 68.95])):
        entries = rows[method]
        assert [e["paper"] for e in entries] == paper
        assert [e["cell"] for e in entries] == [f"gdmp-{guidance}-vanilla-linf", f"gdmp-{guidance}-vanilla-linf",
                                                f"gdmp-{guidance}-vanilla-l2"]
        flags = plan.cells[entries[0]["cell"]]
        assert flags["defense"] == "gdmp" and flags["guidance"] == guidance and flags["ddpm"] == p["ddpm"]
        ns = tables.resolve("x", tables.cell_argv(plan.args, flags, str(tmp_path / "x")))
        assert (ns.guidance, ns.t_star, ns.gdmp_iters) == (guidance, 0.036, 4)
        assert tables.model_calls(flags) == 144
    plan = tables.make_plan(tables.parse_args(["--table", "1", *base, "--out", str(tmp_path / "t1")]))
    gdmp = [r["entries"][1] for r in plan.rows]
    assert [e["paper"] for e in gdmp] == [91.8, 53.13, 40.97]
    assert [e["cell"] for e in gdmp] == ["gdmp-mse-vanilla-linf", "gdmp-mse-vanilla-linf-eot1", "gdmp-mse-vanilla-linf"]
    tables.main(["--table", "2", *base, "--out", str(tmp_path / "t2"), "--dry-run"])
    text = capsys.readouterr().out
    assert all(f"--defense gdmp --norm {n} --setting white-box --classifier {p['clf']} --ddpm {p['ddpm']} "
               f"--guidance {g}" in text for g in ("none", "mse", "ssim") for n in ("linf", "l2"))


def test_dry_run_prints_commands_and_runs_nothing(fake_models, tmp_path, capsys):
    p = fake_models
    out = tmp_path / "t"
    argv = ["--table", "4", "--ddpm", p["ddpm"], "--addt-ddpm", p["addt-ddpm"], "--classifier", p["clf"],
            "--data", p["data"], "--out", str(out), "--dry-run", "--nproc", "2"]
    tables.main(argv)
    text = capsys.readouterr().out
    assert "no bench figures" in text and not out.exists()
    assert text.count("--nproc_per_node=2") == 22  # 2 classifier-only + 5 NFEs x 2 models x 2 norms and "--out " + str(out / "ddpm-addt-nfe5-l2") in text
    bench = {"device": "H100", "settings": {"small": False},
             "attack": {"images": 64, "eot": 10, "model_calls": 101,
                        "rows": [{"path": "ours", "pipelines/s": 101.0, "eval s": 64 * 101 * 0.001}]}}
    write_json(str(tmp_path / "bench.json"), bench)
    tables.main(argv + ["--bench", str(tmp_path / "bench.json")])
    text = capsys.readouterr().out
    assert "projected times from" in text and not out.exists()
    # NFE 5 (6 calls), PGD20-EoT10, 1024 images, 2 processes: 1024 * 6 * (200 / 101 / 101 + 2 * 0.001) / 2 s
    want = tables.format_seconds(1024 * 6 * (200 / 101 / 101 + 2 * 0.001) / 2)
    assert f"ddpm-vanilla-nfe5-linf --resume  # ~{want}" in text


def test_small_table_runs_and_resumes(smoke_inputs, tmp_path, capsys):
    addt = tmp_path / "addt"  # ADDT = a copy of the same tiny UNet
    shutil.copytree(smoke_inputs["ddpm"], addt)
    out = tmp_path / "table4"
    argv = ["--table", "4", "--ddpm", smoke_inputs["ddpm"], "--addt-ddpm", str(addt), "--classifier",
            smoke_inputs["classifier"], "--data", smoke_inputs["data"], "--nfes", "5", "--norms", "linf",
            "--no-classifier-row", "--n", "3", "--steps", "1", "--eot", "1", "--device", "cpu", "--chunk", "3",
            "--out", str(out)]
    cells = ["ddpm-vanilla-nfe5-linf", "ddpm-addt-nfe5-linf"]

    tables.main(argv + ["--max-cells", "1"])  # interrupted after the first cell
    assert (out / cells[0] / "summary.json").exists() and not (out / cells[1] / "summary.json").exists()
    partial = json.load(open(out / "table4.json"))
    assert partial["cells"][cells[1]]["status"] == "pending"
    mtime = os.path.getmtime(out / cells[0] / "summary.json")
    capsys.readouterr()

    tables.main(argv)
    text = capsys.readouterr().out
    assert f"cell {cells[0]}:" not in text and f"cell {cells[1]}: finished" in text
    assert os.path.getmtime(out / cells[0] / "summary.json") == mtime
    data = json.load(open(out / "table4.json"))
    row = data["rows"][0]
    assert row["labels"] == ["CIFAR-10", "5"] and data["columns"][:2] == ["Vanilla Clean", "Vanilla l_inf"]
    for e in row["entries"]:
        if e["cell"] is None:  # l_2 left out: the paper's number only
            assert e["status"] == "not run" and e["ours"] is None
            continue
        s = json.load(open(out / e["cell"] / "summary.json"))
        key = "clean_accuracy" if e["metric"] == "clean" else "robust_accuracy"
        assert e["ours"] == s[key] and e["ci"] == s[key.replace("accuracy", "ci")] and e["n"] == 3
    md = open(out / "table4.md").read()
    assert "| CIFAR-10 | 5 | 49.51 (ours " in md and "21.78 (ours " in md and "Cells finished: 2/2" in md

    # a lost summary: only that cell runs again (attack.py --resume finds every record), the table is rebuilt
    os.remove(out / cells[1] / "summary.json")
    os.remove(out / "table4.md")
    tables.main(argv)
    assert os.path.getmtime(out / cells[0] / "summary.json") == mtime
    assert (out / cells[1] / "summary.json").exists() and (out / "table4.md").exists()
    assert json.load(open(out / "table4.json"))["rows"] == data["rows"]

    # other flags for finished cells are refused, naming the flag
    with pytest.raises(UserError, match="--steps"):
        tables.main([a if a != "1" else "2" for a in argv])


def test_nproc_runs_a_cell_under_torchrun(smoke_inputs, tmp_path):
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, "tables.py", "--table", "4", "--classifier", smoke_inputs["classifier"],
                           "--data", smoke_inputs["data"], "--norms", "linf", "--n", "3", "--steps", "1",
                           "--device", "cpu", "--nproc", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.load(open(out / "classifier-linf" / "summary.json"))
    assert s["n"] == 3 and sorted(os.listdir(out / "classifier-linf")).count("records-1.jsonl") == 1
    # a bad flag: one error line, exit status 2
    proc = subprocess.run([sys.executable, "tables.py", "--table", "4", "--classifier", "missing.pt"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_tables_6_and_10_cells(fake_models, tmp_path):
    """Table 10: the corrector columns are DiffPure's cells plus --corrector langevin; table 6: DP_DDIM-100 is
    n = 100 (NFE 10), compared with the Tiny-ImageNet rows."""
    p = fake_models
    base = ["--classifier", p["clf"], "--out", str(tmp_path / "t")]
    plan = tables.make_plan(tables.parse_args(["--table", "10", "--vpsde", p["vpsde"], "--addt-vpsde", p["addt-vpsde"],
                                               "--data", p["data"], *base]))
    langevin = {n for n, f in plan.cells.items() if f.get("corrector") == "langevin"}
    assert len(plan.cells) == 8 and len(langevin) == 4 and all(n.endswith(("-langevin-linf", "-langevin-l2")) for n in langevin)
    clean = plan.rows[0]["entries"]
    assert [e["paper"] for e in clean] == [89.26, 85.25, 89.94, 85.55]
    assert [plan.cells[e["cell"]].get("corrector") for e in clean] == [None, "langevin", None, "langevin"]
    ns = tables.resolve("x", tables.cell_argv(plan.args, plan.cells[clean[1]["cell"]], str(tmp_path / "x")))
    assert ns.corrector == "langevin" and ns.snr == 0.16
    tiny = tmp_path / "tiny-imagenet-200"
    tiny.mkdir()
    plan = tables.make_plan(tables.parse_args(["--table", "6", "--ddpm", p["ddpm"], "--addt-ddpm", p["addt-ddpm"],
                                               "--data", str(tiny), *base]))
    assert plan.args.dataset == "Tiny-ImageNet" and not plan.notes
    assert {f.get("nfe") for f in plan.cells.values() if f["defense"] == "ddim"} == {10}
    assert [e["paper"] for e in plan.rows[2]["entries"]] == [60.35, 4.79, 39.75, 60.45, 5.86, 40.82]


def test_table_7_runs_fid_py_per_model_and_reports_its_fid(fake_models, tmp_path, capsys):
    """FID cells are fid.py runs sharing one reference-statistics file; a finished cell (fid.json) is reported
    beside the paper's number, with its sampling flags checked."""
    p, out = fake_models, tmp_path / "t"
    argv = ["--table", "7", "--ddpm", p["ddpm"], "--addt-ddpm", p["addt-ddpm"], "--data", p["data"], "--out", str(out),
            "--fid-n", "100", "--inception", p["inception"]]
    plan = tables.main(argv + ["--dry-run"])
    assert set(plan.cells) == {"fid-vanilla", "fid-addt"} and set(plan.left_out) == {"no --ft-ddpm", "no --linf-ddpm"}
    cmd = plan.args.commands["fid-vanilla"]
    assert cmd[1].endswith("fid.py") and cmd[cmd.index("--ref-stats") + 1] == str(out / "fid-ref-stats.npz")
    assert cmd[cmd.index("--num-images") + 1] == "100" and "--resume" in cmd
    assert "fid.py" in capsys.readouterr().out
    import fid
    ns = fid.parse_args(cmd[2:])
    os.makedirs(out / "fid-vanilla")
    with open(out / "fid-vanilla" / "fid.json", "w") as f:
        json.dump({"fid": 3.1234, "n": 100, "args": {k: getattr(ns, k) for k in fid.SAMPLE_FLAGS}}, f)
    tables.main(argv + ["--report-only"])
    table = (out / "table7.md").read_text()
    assert "| FID | 3.196 (ours 3.123) | 3.500 | 5.190 (ours: pending) | 13.608 |" in table
    report = json.loads((out / "table7.json").read_text())
    assert report["cells"]["fid-vanilla"]["fid"] == 3.1234
    with open(out / "fid-vanilla" / "fid.json", "w") as f:  # a finished cell made with other sampling flags
        json.dump({"fid": 3.1, "n": 50, "args": {**{k: getattr(ns, k) for k in fid.SAMPLE_FLAGS}, "n": 50}}, f)
    with pytest.raises(UserError, match="other settings"):
        tables.main(argv + ["--report-only"])
