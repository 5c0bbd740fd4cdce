"""analyze.py: every subcommand end to end on the tiny smoke models, its JSON checked against a direct
computation (keyed noise built here by hand, the purifier and classifier called directly)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import analyze
import attack
import train_addt
from addt_attacks import EVAL, FIXED, SEMI, Defense, pgd_eot
from addt_common import UserError, append_jsonl, sample_seed, write_json
from addt_data import load_split, to_float
from addt_diffusion import KeyedNoise, ddpm_purifier, load_unet, make_schedule
from models import load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_MPL = True
try:
    import matplotlib  # noqa: F401
except ImportError:
    HAVE_MPL = False


@pytest.fixture(scope="module")
def tiny(smoke_inputs):
    """The smoke models as the subcommands build them (NFE 5), and the first test images."""
    unet = load_unet(smoke_inputs["ddpm"]).eval().requires_grad_(False)
    clf = load_classifier(smoke_inputs["classifier"]).eval().requires_grad_(False)
    data = load_split(smoke_inputs["data"], "test")
    return ddpm_purifier(unet, make_schedule("ddpm", 5)), clf, to_float(data.images[:4]), data.labels[:4]


def model_argv(inputs, out, command, *extra):
    return [command, "--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"],
            "--nfe", "5", "--device", "cpu", "--chunk", "8", "--batch-size", "2", "--out", str(out),
            *([] if HAVE_MPL else ["--no-plot"]), *extra]


def written(out, name):
    data = json.load(open(os.path.join(out, f"{name}.json")))
    assert data["name"] == name and data["figure"] == analyze.FIGURES[name] and data["seconds"] >= 0
    assert os.path.exists(os.path.join(out, f"{name}.png")) == HAVE_MPL
    return data


def direct_loss(purifier, clf, x, y, keys, n_fixed=math.inf):
    """CE of classifier(purify(x)) with the noise of image b keyed by keys[b] (every draw fixed)."""
    k = torch.tensor(keys)
    with torch.no_grad():
        return F.cross_entropy(clf(purifier(x, KeyedNoise(k, k, n_fixed))), y, reduction="none")


# ---------------------------------------------------------------- figures 2 and 6

def summary(folder, defense, model, setting, robust, n=64, ci=True, norm="linf", semi_n=128):
    os.makedirs(folder, exist_ok=True)
    s = {"args": {"defense": defense, "ddpm": model, "setting": setting, "norm": norm, "nfe": 100, "semi_n": semi_n,
                  "steps": 20, "eot": 10 if setting == "white-box" else 1},
         "n": n, "clean_accuracy": 90.0, "robust_accuracy": robust, "protocol": "single", "attack": "pgd"}
    if ci:
        s["robust_ci"] = [robust - 5, robust + 5]
    write_json(os.path.join(folder, "summary.json"), s)


def test_settings_reads_hand_written_summaries(tmp_path):
    root = tmp_path / "runs"
    values = {}
    for model, shift in (("models/vanilla", 0.0), ("models/addt", 4.0)):
        for k, setting in enumerate(("white-box", "dw-fwd", "dw-both", "dw-semi")):
            for defense in ("ddpm", "ddim"):
                robust = 50.0 - 10 * k + shift + (defense == "ddim")
                values[(defense, model, setting)] = robust
                summary(root / model.split("/")[1] / f"{defense}-{setting}", defense, model, setting, robust,
                        ci=defense == "ddpm")
    out = tmp_path / "fig"
    analyze.main(["settings", str(root), "--out", str(out), "--label", "models/addt=ADDT",
                  *([] if HAVE_MPL else ["--no-plot"])])
    data = written(out, "settings")
    rows = data["rows"]
    assert len(rows) == 16
    for r in rows:
        model = "models/addt" if r["model"] == "ADDT" else "models/vanilla"
        setting = r["setting"].replace("-128", "")
        assert r["robust_accuracy"] == values[(r["defense"], model, setting)]
        if r["defense"] == "ddpm":  # the summary's interval, else Wilson's from n and the accuracy
            assert r["robust_ci"] == [r["robust_accuracy"] - 5, r["robust_accuracy"] + 5]
        else:
            lo, hi = r["robust_ci"]
            assert lo < r["robust_accuracy"] < hi and hi - lo > 10
    assert {r["model"] for r in rows} == {"ADDT", "models/vanilla"}
    ddpm_vanilla = [r["setting"] for r in rows if r["defense"] == "ddpm" and r["model"] == "models/vanilla"]
    assert ddpm_vanilla == ["white-box", "dw-fwd", "dw-both", "dw-semi-128"]

    # redraw from the JSON; a duplicate run is refused with both folders named
    if HAVE_MPL:
        os.remove(out / "settings.png")
        analyze.main(["plot", str(out / "settings.json")])
        assert (out / "settings.png").exists()
    summary(root / "copy", "ddpm", "models/addt", "dw-both", 1.0)
    with pytest.raises(UserError, match="two runs for ddpm"):
        analyze.main(["settings", str(root), "--out", str(tmp_path / "f2"), "--label", "models/addt=ADDT", "--no-plot"])
    with pytest.raises(UserError, match="no attack.py run"):
        analyze.main(["settings", str(tmp_path / "fig"), "--out", str(tmp_path / "f3"), "--no-plot"])


# ---------------------------------------------------------------- figure 7

class ReplayDefense(Defense):
    """White-box in name, but every purification replays dw-both's fixed draws."""

    def keys(self, i, stage, step, draw, eot=1):
        fixed = sample_seed(self.seed, i, FIXED)
        return fixed, fixed, math.inf


def test_eot_one_with_dw_both_noise_has_cosine_one(tiny):
    purifier, clf, x, y = tiny
    det = Defense(purifier, clf, "dw-both", chunk=8)
    cos, sign_cos = analyze.eot_cosines(det, ReplayDefense(purifier, clf, "white-box", chunk=8), x, y, [0, 1, 2, 3],
                                        [1, 2, 4])
    assert torch.allclose(torch.tensor(cos), torch.ones(4, 3), atol=1e-5)
    assert torch.allclose(torch.tensor(sign_cos), torch.ones(4, 3), atol=1e-6)
    # with fresh draws the prefix sums are eot_gradient's EoT-k gradients
    wb = Defense(purifier, clf, "white-box", chunk=8)
    grads = analyze.per_draw_gradients(wb, x[:2], y[:2], [0, 1], 3)
    g3, _, _ = wb.eot_gradient(x[:2], y[:2], [0, 1], 0, 3)
    assert torch.allclose(grads.sum(0), g3, rtol=1e-5, atol=1e-7)


def test_eot_similarity_end_to_end(smoke_inputs, tiny, tmp_path):
    purifier, clf, x, y = tiny
    analyze.main(model_argv(smoke_inputs, tmp_path, "eot-similarity", "--n", "2", "--eots", "1,2", "--steps", "1"))
    data = written(tmp_path, "eot-similarity")
    assert data["eots"] == [1, 2] and data["n"] == 2 and len(data["cosine"]["per_image"]) == 2
    det, wb = Defense(purifier, clf, "dw-both", chunk=8), Defense(purifier, clf, "white-box", chunk=8)
    g_det, _, _ = det.eot_gradient(x[:2], y[:2], [0, 1], 0, 1)
    g2, _, _ = wb.eot_gradient(x[:2], y[:2], [0, 1], 0, 2)
    cos = F.cosine_similarity(g2.flatten(1), g_det.flatten(1), dim=1)
    assert torch.allclose(torch.tensor(data["cosine"]["per_image"])[:, 1], cos, atol=1e-5)
    assert abs(data["cosine"]["mean"][1] - float(cos.mean())) < 1e-5
    _, records = pgd_eot(wb, x[:2], y[:2], [0, 1], steps=1, eot=2)
    assert data["robust"]["robust_accuracy"][1] == 100 * sum(r["robust"] for r in records) / 2


# ---------------------------------------------------------------- figure 8

def test_semi_curve_at_zero_is_the_clean_loss(smoke_inputs, tiny, tmp_path):
    purifier, clf, x, y = tiny
    analyze.main(model_argv(smoke_inputs, tmp_path, "semi-curve", "--n", "2", "--semi-n", "2", "--k-max", "2"))
    data = written(tmp_path, "semi-curve")
    assert data["k"] == [-2, -1, 0, 1, 2] and data["n"] == 2
    both = direct_loss(purifier, clf, x[:2], y[:2], [sample_seed(0, i, FIXED) for i in range(2)])
    semi = sum(direct_loss(purifier, clf, x[:2], y[:2], [sample_seed(0, i, SEMI, j) for i in range(2)])
               for j in range(2)) / 2
    curves = data["curves"]
    for name, want in (("dw-both", both), ("dw-semi", semi), ("random (dw-both noise)", both)):
        got = torch.tensor(curves[name]["per_image"])[:, 2]
        assert torch.allclose(got, want, atol=1e-5), name
        assert torch.allclose(torch.tensor(data["clean_loss"][name]), want, atol=1e-5)
    # k = 1 of dw-both: the sign of the dw-both gradient, 1/255, evaluated under the same fixed noise
    det = Defense(purifier, clf, "dw-both", chunk=8)
    g, _, _ = det.eot_gradient(x[:2], y[:2], [0, 1], 0, 1)
    step = direct_loss(purifier, clf, (x[:2] + g.sign() / 255).clamp(0, 1), y[:2],
                       [sample_seed(0, i, FIXED) for i in range(2)])
    assert torch.allclose(torch.tensor(curves["dw-both"]["per_image"])[:, 3], step, atol=1e-5)


# ---------------------------------------------------------------- figure 3

def test_landscape_endpoints_are_the_exact_losses(smoke_inputs, tiny, tmp_path):
    purifier, clf, x, y = tiny
    extra = ["--n", "2", "--steps", "2", "--eot", "2", "--grid", "3"]
    analyze.main(model_argv(smoke_inputs, tmp_path / "a", "landscape", *extra))
    m = written(tmp_path / "a", "landscape")["models"][0]
    keys = [sample_seed(0, i, FIXED) for i in range(2)]  # the surface's noise: dw-both's
    for setting, eot, run in (("dw-both", 1, "det"), ("white-box", 2, "eot")):
        traj = []
        x_adv, records = pgd_eot(Defense(purifier, clf, setting, chunk=8), x[:2], y[:2], [0, 1], steps=2, eot=eot,
                                 trajectory=traj, trajectory_deltas=2)
        loss = float(direct_loss(purifier, clf, x_adv, y[:2], keys).mean())
        t = m["trajectories"][setting]
        assert abs(m["endpoints"][setting]["loss"] - loss) < 1e-5 and abs(t["loss"][-1] - loss) < 1e-5
        assert t["residual"][-1] < 1e-6 and t["robust_accuracy"] == 100 * sum(r["robust"] for r in records) / 2
        folder = tmp_path / run  # saved the way attack.py saves them, for --runs below
        folder.mkdir()
        attack.save_trajectory(str(folder), 0, records, traj)
        append_jsonl(str(folder / "records-0.jsonl"), records)
        write_json(str(folder / "args.json"), {"setting": setting})
    assert abs(m["clean_loss"] - float(direct_loss(purifier, clf, x[:2], y[:2], keys).mean())) < 1e-5
    t = m["trajectories"]
    assert abs(t["dw-both"]["a"][-1] - 1) < 1e-6 and abs(t["dw-both"]["b"][-1]) < 1e-6
    assert abs(t["white-box"]["a"][-1] - m["c"]) < 1e-6 and abs(t["white-box"]["b"][-1] - 1) < 1e-6
    assert len(m["surface"]) == 3 and len(m["grid_a"]) == 3

    # the runs' trajectories give the same figure; two models side by side (here the same network twice)
    runs = [str(tmp_path / r) for r in ("det", "eot", "det", "eot")]
    analyze.main(model_argv(smoke_inputs, tmp_path / "b", "landscape", *extra, "--runs", *runs,
                            "--addt", smoke_inputs["ddpm"], "--no-plot"))
    models = json.load(open(tmp_path / "b" / "landscape.json"))["models"]
    assert [r["label"] for r in models] == ["vanilla", "ADDT"]
    for again in models:
        assert torch.allclose(torch.tensor(again["surface"]), torch.tensor(m["surface"]), atol=1e-5)
        for setting in ("dw-both", "white-box"):
            assert again["endpoints"][setting] == pytest.approx(m["endpoints"][setting])
    with pytest.raises(UserError, match="expected dw-both"):
        analyze.main(model_argv(smoke_inputs, tmp_path / "c", "landscape", *extra, "--runs", runs[1], runs[0],
                                "--no-plot"))


# ---------------------------------------------------------------- figure 1

def test_trajectories(smoke_inputs, tiny, tmp_path):
    purifier, clf, x, y = tiny
    analyze.main(model_argv(smoke_inputs, tmp_path, "trajectories", "--n", "2", "--steps", "2", "--eot", "2",
                            "--loss-draws", "2"))
    data = written(tmp_path, "trajectories")
    assert [e["index"] for e in data["images"]] == [0, 1]
    # iterate 0 is the clean image: the mean CE over 2 fresh white-box draws, keyed (image, EVAL, step 0, draw)
    clean = sum(direct_loss(purifier, clf, x[:2], y[:2], [sample_seed(0, i, EVAL, 0, d) for i in range(2)], 0)
                for d in range(2)) / 2
    for b, e in enumerate(data["images"]):
        assert set(e["attacks"]) == set(analyze.ATTACKS)
        for name, a in e["attacks"].items():
            assert len(a["xy"]) == 3 and len(a["loss"]) == 3 and len(a["attack_loss"]) == 2
            assert abs(a["loss"][0] - float(clean[b])) < 1e-5
            assert 0 < a["straightness"] <= 1 + 1e-9
        assert abs(e["attacks"]["dw-both"]["cosine_with_dw_both"] - 1) < 1e-6
        assert e["attacks"]["white-box"]["xy"][0] == e["attacks"]["dw-both"]["xy"][0]  # the shared zero start
        assert sum(e["explained_variance"]) <= 1 + 1e-9
    assert data["summary"]["dw-both"]["cosine_with_dw_both"] == pytest.approx(1)


# ---------------------------------------------------------------- figure 9

def test_rbgm_ranks(smoke_inputs, tiny, tmp_path):
    analyze.main(model_argv(smoke_inputs, tmp_path, "rbgm-ranks", "--n", "6", "--batch-size", "3", "--bins", "4",
                            "--cgpo-iters", "2"))
    data = written(tmp_path, "rbgm-ranks")
    assert data["rows_are_permutations"] and data["rbgm_keeps_ranks"] and data["row_length"] == 1024
    assert len(data["histograms"]) == 9 and [r["index"] for r in data["ranks"]] == list(range(6))
    for h in data["histograms"]:
        assert sum(h["counts"]) == 6  # one rank per image
        counts = torch.tensor(h["counts"], dtype=torch.float64)
        stat = float(((counts - 1.5) ** 2 / 1.5).sum())
        assert h["chi2"] == pytest.approx(stat) and h["df"] == 3
        ch = "RGB".index(h["channel"])
        bins = [(e["ranks"][ch][data["histograms"].index(h) % 3] - 1) * 4 // 1024 for e in data["ranks"]]
        assert [bins.count(k) for k in range(4)] == h["counts"]
    p = data["histograms"][0]["p_value"]
    assert 0 <= p <= 1
    # chi-square p-value: P(chi2_3 > stat) in closed form for df = 3
    stat = data["histograms"][0]["chi2"]
    closed = math.erfc(math.sqrt(stat / 2)) + math.sqrt(2 * stat / math.pi) * math.exp(-stat / 2)
    assert p == pytest.approx(closed, rel=1e-9, abs=1e-12)

    # the ranks of batch 0 recomputed directly from its keyed draws
    purifier, clf, _, _ = tiny
    unet = load_unet(smoke_inputs["ddpm"]).train()
    train_addt.set_dropout(unet, 0.1)
    data_split = load_split(smoke_inputs["data"], "train")
    x0 = 2 * to_float(data_split.images[:3]) - 1
    family = train_addt.DDPM(torch.device("cpu"))
    seed = sample_seed(0, 0)
    g_rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t = family.sample_t(3, g_rng)
    a, s = family.scales(t)
    args = type("A", (), {"perturb": "rbgm", "cgpo_iters": 2, "guidance": "ce"})
    delta, _, g = train_addt.cgpo(family, unet, clf, x0, data_split.labels[:3], t, train_addt.lambda_t(a, s), args,
                                  g_rng, lambda: torch.autocast("cpu", enabled=False))
    assert torch.equal(analyze.row_ranks(g), analyze.row_ranks(delta))  # RBGM keeps g's ranks
    ranks = analyze.row_ranks(g)
    flat = [0, 7 * 32 + 7, 15 * 32 + 15]
    assert [e["ranks"] for e in data["ranks"][:3]] == [ranks[k][:, flat].tolist() for k in range(3)]


# ---------------------------------------------------------------- sharding, errors

def test_torchrun_shards_give_the_same_json(smoke_inputs, tmp_path, torchrun):
    args = ["--n", "3", "--semi-n", "2", "--k-max", "1", "--no-plot", "--batch-size", "1", "--chunk", "4"]
    analyze.main(model_argv(smoke_inputs, tmp_path / "one", "semi-curve", *args))
    argv = model_argv(smoke_inputs, tmp_path / "two", "semi-curve", *args)
    argv[argv.index("--n")] = "--num-images"
    proc = torchrun("analyze.py", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.load(open(tmp_path / d / "semi-curve.json")) for d in ("one", "two"))
    assert two["processes"] == 2 and two["n"] == 3
    for name, c in one["curves"].items():
        assert torch.allclose(torch.tensor(two["curves"][name]["per_image"]), torch.tensor(c["per_image"]), atol=1e-6)


def test_clear_errors(smoke_inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(UserError, match="pip install matplotlib"):
        analyze.parse_args(model_argv(smoke_inputs, tmp_path, "semi-curve"))
    analyze.parse_args(model_argv(smoke_inputs, tmp_path, "semi-curve", "--no-plot"))  # fine without
    monkeypatch.undo()
    for extra, match in ((["--eval-sets", "5", "--semi-n", "4"], "--eval-sets"), (["--nfe", "3"], "does not divide")):
        with pytest.raises(UserError, match=match):
            analyze.parse_args(model_argv(smoke_inputs, tmp_path, "semi-curve", *extra))
    with pytest.raises(UserError, match="row,col"):
        analyze.parse_args(model_argv(smoke_inputs, tmp_path, "rbgm-ranks", "--pixels", "1,2,3"))
    with pytest.raises(UserError, match="DW_RUN EOT_RUN"):
        analyze.parse_args(model_argv(smoke_inputs, tmp_path, "landscape", "--runs", str(tmp_path)))
    # one 'error:' line and exit status 2 from the command line, before any model is loaded
    proc = subprocess.run([sys.executable, "analyze.py", "settings", str(tmp_path / "missing"), "--no-plot"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    # an earlier result is kept unless --overwrite
    (tmp_path / "semi-curve.json").write_text("{}")
    with pytest.raises(UserError, match="--overwrite"):
        analyze.main(model_argv(smoke_inputs, tmp_path, "semi-curve", "--n", "1", "--no-plot"))
