"""attack.py: exact gradients, the settings' noise sharing, projections, sharding and resume."""
import json

import pytest
import torch
import torch.nn.functional as F

import attack
from addt_attacks import ATTACK, CLEAN, EVAL, Defense, pgd_step
from addt_common import UserError
from addt_diffusion import ddpm_purifier, ddpm_purify, make_schedule
from models import build_classifier
from models.unet import UNet

@pytest.fixture(scope="module")
def inputs(smoke_inputs):
    return smoke_inputs


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = UNet({**attack.TINY_UNET_CONFIG, "sample_size": 16}).eval().requires_grad_(False)
    clf = build_classifier("wrn-10-1", 10).eval().requires_grad_(False)
    return unet, clf


def args_for(setting, **kw):
    """The attack's resolved flags, as parse_args gives them."""
    kw = {"semi_n": 4, "steps": 3, "nfe": 5, "chunk": 4, **kw}
    argv = ["--setting", setting] + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return attack.parse_args(argv)


def pipeline_loss(unet, clf, x, y, sched, eps, zs, grad_checkpoint):
    return F.cross_entropy(clf(ddpm_purify(unet, x, sched, (eps, zs), grad_checkpoint=grad_checkpoint)), y,
                           reduction="sum")


def test_checkpointed_gradient_equals_plain_autograd(tiny):
    unet, clf = tiny
    sched = make_schedule("ddpm", 10)
    x = torch.rand(3, 3, 16, 16)
    y = torch.tensor([0, 1, 2])
    eps, zs = torch.randn_like(x), torch.randn(sched.n_noise, *x.shape)
    grads = []
    for ckpt in (True, False):
        xi = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(pipeline_loss(unet, clf, xi, y, sched, eps, zs, ckpt), xi)[0])
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() < 1e-5
    assert all(p.grad is None for p in list(unet.parameters()) + list(clf.parameters()))


def test_finite_differences_float64_dw_both(tiny):
    """With every noise fixed (dw-both) the defended model is a deterministic function: its autograd
    gradient matches central differences in float64 along random directions."""
    unet, clf = (m.double() for m in tiny)
    try:
        sched = make_schedule("ddpm", 5)
        g = torch.Generator().manual_seed(3)
        x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 0.8 + 0.1
        y = torch.tensor([3, 7])
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
        zs = torch.randn((sched.n_noise, *x.shape), generator=g, dtype=torch.float64)
        f = lambda z: pipeline_loss(unet, clf, z, y, sched, eps, zs, True)  # noqa: E731
        xi = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(f(xi), xi)[0]
        with torch.no_grad():
            for _ in range(3):
                v = torch.randn(x.shape, generator=g, dtype=torch.float64)
                # the pipeline has kinks (x0 clip, ReLU): a step may cross one, so two small steps are
                # tried and the better must agree
                err = min(abs((f(x + h * v) - f(x - h * v)) / (2 * h) - (grad * v).sum()) for h in (1e-7, 1e-8))
                assert err < 1e-6 * max(1.0, abs((grad * v).sum()))
    finally:
        for m in tiny:
            m.float()


def keys(args, stage, step, draw, i=5):
    """(key of the forward draw, key of the reverse draws) of one pipeline under args' setting."""
    fresh, fixed, n_fixed = Defense(None, None, args.setting, args.seed, args.semi_n).keys(i, stage, step, draw,
                                                                                         args.eot)
    return (fixed if n_fixed > 0 else fresh), (fixed if n_fixed > 1 else fresh)


def test_white_box_draws_fresh_noise_everywhere():
    a = args_for("white-box")
    seen = [keys(a, ATTACK, s, d) for s in range(3) for d in range(a.eot)] + [keys(a, EVAL, 3, 0), keys(a, CLEAN, 3, 0)]
    assert len({k[0] for k in seen}) == len(seen) and len({k[1] for k in seen}) == len(seen)
    assert keys(a, ATTACK, 0, 0, i=1) != keys(a, ATTACK, 0, 0, i=2)  # images do not share noise


def test_dw_fwd_fixes_only_the_forward_noise():
    a = args_for("dw-fwd")
    assert a.eot == 1
    seen = [keys(a, ATTACK, s, 0) for s in range(3)] + [keys(a, EVAL, 3, 0)]
    assert len({k[0] for k in seen}) == 1  # shared by every attack step and the evaluation
    assert len({k[1] for k in seen}) == len(seen)  # reverse noise fresh each time


def test_dw_both_fixes_everything_and_shares_it_with_evaluation():
    a = args_for("dw-both")
    seen = {keys(a, stage, s, 0) for stage in (ATTACK, EVAL, CLEAN) for s in range(3)}
    assert len(seen) == 1
    with pytest.raises(UserError, match="dw-both"):
        args_for("dw-both", eot=3)


def test_dw_semi_cycles_through_exactly_n_sets():
    a = args_for("dw-semi", semi_n=4, eot=3, steps=5)  # 15 draws over 4 sets: cycles
    used = [keys(a, ATTACK, s, d) for s in range(a.steps) for d in range(a.eot)]
    assert len(set(used)) == 4
    assert used[:4] == used[4:8]  # the cycle repeats in order
    evals = {keys(a, EVAL, a.steps, d, i=i) for i in [5] for d in range(10)}
    assert evals <= set(used)  # evaluation draws one of the N sets
    assert args_for("dw-semi", semi_n=7).eot == 7  # default: EoT over the whole set


def test_noise_reaches_the_purification(tiny):
    """Through the real Defense: dw-both gives the attacker exactly the evaluated function,
    white-box does not."""
    unet, clf = tiny
    x = torch.rand(2, 3, 16, 16)
    out = {}
    for setting in ("dw-both", "white-box"):
        a = args_for(setting)
        d = Defense(ddpm_purifier(unet, make_schedule("ddpm", 5)), clf, setting, a.seed, a.semi_n, a.chunk)
        with torch.no_grad():
            out[setting] = [d.logits(x, [(0, 2, 0), (1, 2, 0)], ATTACK), d.logits(x, [(0, 3, 0), (1, 3, 0)], EVAL)]
    assert torch.equal(*out["dw-both"])
    assert not torch.allclose(*out["white-box"])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_steps_stay_in_budget_and_image_range(norm):
    a = args_for("white-box", norm=norm)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 8, 8, generator=g)
    x[0] = 0.0  # corners of the image range
    x[1] = 1.0
    x_adv = x.clone()
    for _ in range(30):
        x_adv = pgd_step(x, x_adv, torch.randn(x.shape, generator=g) * 10, a.eps, a.step_size, a.norm)
        d = (x_adv - x).flatten(1)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        if norm == "linf":
            assert d.abs().max() <= a.eps + 1e-7
        else:
            assert d.norm(dim=1).max() <= a.eps + 1e-6
    assert (x_adv - x).abs().max() > 0.5 * a.step_size  # it moved


def run_attack(inputs, out, *extra):
    argv = ["--setting", "white-box", "--eot", "2", "--steps", "2", "--nfe", "5", "--n", "6",
            "--chunk", "4", "--device", "cpu", "--out", str(out), "--ddpm", inputs["ddpm"],
            "--classifier", inputs["classifier"], "--data", inputs["data"], *extra]
    return attack.main(argv)


def records(out):
    return {i: r for i, r in sorted(attack.read_records(str(out)).items())}


def test_records_do_not_depend_on_batch_size_processes_or_resume(inputs, tmp_path, monkeypatch, torchrun):
    s = run_attack(inputs, tmp_path / "b2", "--batch-size", "2")
    run_attack(inputs, tmp_path / "b5", "--batch-size", "5")
    ref = records(tmp_path / "b2")
    assert sorted(ref) == list(range(6)) and records(tmp_path / "b5") == ref
    for r in ref.values():
        assert r["linf"] <= 8 / 255 + 1e-6
    assert s["n"] == 6 and s["clean_accuracy"] == 100 * sum(r["clean_pred"] == r["label"] for r in ref.values()) / 6

    # interrupted after the first batch, then resumed
    calls = []
    real_append = attack.append_jsonl

    def append_then_die(path, recs):
        real_append(path, recs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(attack, "append_jsonl", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_attack(inputs, tmp_path / "resumed", "--batch-size", "4")
    monkeypatch.setattr(attack, "append_jsonl", real_append)
    assert len(records(tmp_path / "resumed")) == 4
    with pytest.raises(UserError, match="--resume"):
        run_attack(inputs, tmp_path / "resumed", "--batch-size", "4")
    with pytest.raises(UserError, match="eot"):
        run_attack(inputs, tmp_path / "resumed", "--batch-size", "4", "--resume", "--eot", "3")
    run_attack(inputs, tmp_path / "resumed", "--batch-size", "4", "--resume")
    assert records(tmp_path / "resumed") == ref

    # two processes (gloo on CPU, one thread each like the runs above: CPU results depend on the thread count)
    proc = torchrun("attack.py", "--setting", "white-box", "--eot", "2", "--steps", "2", "--nfe", "5",
                    "--num-images", "6", "--chunk", "4", "--batch-size", "3", "--device", "cpu",
                    "--out", tmp_path / "ddp", "--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"],
                    "--data", inputs["data"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(tmp_path / "ddp") == ref
    summary = json.load(open(tmp_path / "ddp" / "summary.json"))
    assert summary["robust_accuracy"] == s["robust_accuracy"]
    assert (tmp_path / "ddp" / "summary.md").read_text().startswith("| defense")


def test_bare_classifier_is_broken(inputs, tmp_path):
    """--defense none: PGD on a trained classifier drives robust accuracy to about 0."""
    s = attack.main(["--defense", "none", "--n", "8", "--steps", "5", "--chunk", "8", "--device", "cpu",
                     "--out", str(tmp_path), "--classifier", inputs["classifier"], "--data", inputs["data"]])
    assert s["clean_accuracy"] >= 75.0 and s["robust_accuracy"] == 0.0  # 7 of the first 8 (one per class)
    assert s["timesteps"] == []


def test_mean_k_protocol(inputs, tmp_path):
    s = run_attack(inputs, tmp_path, "--protocol", "mean-3", "--steps", "1", "--n", "2")
    rs = attack.read_records(str(tmp_path)).values()
    assert all(r["robust_correct_frac"] in (0, 1 / 3, 2 / 3, 1) and r["robust"] == r["robust_correct_frac"] for r in rs)
    assert s["protocol"] == "mean-3" and s["robust_accuracy"] == pytest.approx(50 * sum(r["robust"] for r in rs))


def test_clear_errors(inputs, tmp_path):
    with pytest.raises(UserError, match="--classifier"):
        attack.main(["--ddpm", inputs["ddpm"], "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--ddpm"):
        attack.main(["--classifier", inputs["classifier"], "--data", inputs["data"], "--n", "8", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="does not divide"):
        run_attack(inputs, tmp_path / "x", "--nfe", "7")
    with pytest.raises(UserError, match="bare classifier"):
        attack.main(["--defense", "none", "--setting", "dw-both", "--classifier", inputs["classifier"]])
    with pytest.raises(UserError, match="holds"):
        run_attack(inputs, tmp_path / "y", "--n", "100000")


def test_smoke_preset_runs_every_family_and_setting(tmp_path, capsys):
    rows = attack.main(["--preset", "smoke", "--out", str(tmp_path)])
    done = {(r["defense"], r["setting"].split("-3")[0]) for r in rows}  # dw-semi is shown as dw-semi-3
    assert {(f, s) for f in ("ddpm", "vpsde", "edm", "gdmp") for s in attack.SETTINGS} <= done and ("none", "white-box") in done
    assert any(r["attack"].startswith("AA-rand-fixed") for r in rows) and any(r["attack"].endswith("l2") for r in rows)
    assert "smoke preset finished" in capsys.readouterr().out


# ---------------------------------------------------------------- what happens when things go wrong

def test_nonfinite_logits_stop_with_the_stage_and_images(inputs, tmp_path, monkeypatch):
    """argmax of NaN logits is class 0: a NaN anywhere used to give ~100 % accuracy. Now the run stops,
    naming the images and the stage, and writes no summary."""
    import models
    real = models.Classifier.forward

    def nan_for_image_1(self, x):
        out = real(self, x)
        return torch.where((x[:, :1, :1, :1] == x[1:2, :1, :1, :1]).view(-1, 1), float("nan"), out)

    monkeypatch.setattr(models.Classifier, "forward", nan_for_image_1)
    with pytest.raises(UserError, match=r"non-finite logits at the clean evaluation for image\(s\) \[1\]"):
        attack.main(["--defense", "none", "--n", "3", "--chunk", "4", "--device", "cpu", "--out", str(tmp_path),
                     "--classifier", inputs["classifier"], "--data", inputs["data"]])
    assert not (tmp_path / "summary.json").exists()


def test_cut_records_line_is_redone_by_one_resume(inputs, tmp_path):
    ref = run_attack(inputs, tmp_path / "whole", "--n", "4", "--batch-size", "2")
    part = tmp_path / "part"
    run_attack(inputs, part, "--n", "4", "--batch-size", "2")
    lines = (part / "records-0.jsonl").read_text().splitlines(keepends=True)
    (part / "records-0.jsonl").write_text("".join(lines[:3]) + lines[3][:25])  # a kill in the middle of line 4
    (part / "summary.json").unlink()
    s = run_attack(inputs, part, "--n", "4", "--batch-size", "2", "--resume")
    assert records(part) == records(tmp_path / "whole") and s["robust_accuracy"] == ref["robust_accuracy"]
    assert len((part / "records-0.jsonl").read_text().splitlines()) == 4


def test_resuming_a_finished_attack_keeps_its_summary(inputs, tmp_path):
    first = run_attack(inputs, tmp_path, "--n", "2")
    again = run_attack(inputs, tmp_path, "--n", "2", "--resume")
    assert again == json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(first))
    assert again["images_per_s"] > 0


def test_cut_args_json_falls_back_to_the_records_fingerprint(inputs, tmp_path):
    run_attack(inputs, tmp_path, "--n", "2")
    (tmp_path / "args.json").write_text('{"setting": "whi')
    (tmp_path / "summary.json").unlink()
    with pytest.raises(UserError, match="fingerprint"):
        run_attack(inputs, tmp_path, "--n", "2", "--resume", "--eot", "3")
    run_attack(inputs, tmp_path, "--n", "2", "--resume")  # the same settings: accepted, args.json rewritten
    assert json.load(open(tmp_path / "args.json"))["eot"] == 2


def test_saved_adversarial_images_reevaluate_to_the_records(inputs, tmp_path):
    """--save-adv pt keeps exact deltas: the final evaluation redone on them gives the recorded predictions."""
    from addt_attacks import EVAL, Defense, measure
    from addt_data import load_split, to_float
    from addt_diffusion import ddpm_purifier, load_unet, make_schedule
    from models import load_classifier
    run_attack(inputs, tmp_path, "--n", "4", "--batch-size", "3", "--save-adv", "pt", "--protocol", "mean-2")
    saved = [torch.load(p, weights_only=True) for p in sorted((tmp_path / "adv").glob("*.pt"))]
    idx = torch.cat([s["index"] for s in saved]).tolist()
    delta = torch.cat([s["delta"] for s in saved])
    data = load_split(inputs["data"], "test")
    x = to_float(data.images[idx])
    defense = Defense(ddpm_purifier(load_unet(inputs["ddpm"]).eval(), make_schedule("ddpm", 5)),
                      load_classifier(inputs["classifier"]), chunk=4)
    m = measure(defense, x + delta, data.labels[idx], idx, EVAL, 2, "mean-2")
    recs = records(tmp_path)
    assert idx == [0, 1, 2, 3] and delta.abs().max() <= 8 / 255 + 1e-6
    assert m["pred"].tolist() == [recs[i]["pred"] for i in idx]
    assert m["frac"].tolist() == [recs[i]["robust_correct_frac"] for i in idx]


def test_trajectory_and_track_best(inputs, tmp_path):
    s_final = run_attack(inputs, tmp_path / "final", "--n", "3", "--log-trajectory", "--trajectory-deltas", "2")
    s_best = run_attack(inputs, tmp_path / "best", "--n", "3", "--track", "best")
    assert s_best["robust_accuracy"] <= s_final["robust_accuracy"]
    recs = records(tmp_path / "final")
    for r in recs.values():
        t = r["trajectory"]
        assert len(t["loss"]) == len(t["score"]) == len(t["linf"]) == 2 and max(t["linf"]) <= 8 / 255 + 1e-6
        assert t["linf"][-1] == pytest.approx(r["linf"])
    deltas = torch.load(next((tmp_path / "final").glob("trajectory-deltas-*.pt")), weights_only=True)
    assert deltas["index"].tolist() == [0, 1] and deltas["deltas"].shape[:2] == (2, 2)
