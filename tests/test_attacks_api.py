"""addt_attacks as a library: APGD against torchattacks (the oracle), random starts, trajectories,
the grad-checkpoint decision and the module docstring's example."""
import math
import re

import pytest
import torch
import torch.nn as nn
import torchattacks

import addt_attacks
from addt_attacks import (ATTACK, EVAL, LOSSES, Defense, NonFiniteError, apgd, apgd_attack, apgd_run, measure,
                          pgd_eot, pgd_start)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval().requires_grad_(False)


def toy_purify(x, noise):
    """Two noise draws, as a purifier with a forward and one reverse draw."""
    return (x + 0.1 * noise(0, x)).clamp(0, 1) * 0.9 + 0.05 * torch.tanh(noise(1, x))


class AsModule(nn.Module):
    """A Defense as a torchattacks model. torchattacks calls it on subsets of the batch, so each row is
    matched to its clean image (the nearest: eps is far below the distance between random images) to
    find the noise keys of a dw-both defence."""

    def __init__(self, defense, x_clean):
        super().__init__()
        self.defense, self.x_clean = defense, x_clean
        self.anchor = nn.Parameter(torch.zeros(1))  # torchattacks reads the device from a parameter

    def forward(self, x):
        rows = torch.cdist(x.flatten(1), self.x_clean.flatten(1)).argmin(1).tolist()
        return self.defense.logits(x, [(i, 0, 0) for i in rows], ATTACK)


MODELS = {"bare": lambda clf, chunk: Defense(None, clf, chunk=chunk),
          "dw-both": lambda clf, chunk: Defense(toy_purify, clf, "dw-both", chunk=chunk)}
NORMS = {"linf": ("Linf", 8 / 255), "l2": ("L2", 0.5)}


def torchattacks_start(x, idx, eps, norm, seed, step):
    """torchattacks' random start, drawn from torch's global generator as its attack_single_run does."""
    n, ones = len(x), torch.ones([len(x), 1, 1, 1])
    if norm == "linf":
        t = 2 * torch.rand(x.shape) - 1
        x0 = x + eps * ones * t / t.reshape([n, -1]).abs().max(dim=1, keepdim=True)[0].reshape([-1, 1, 1, 1])
    else:
        t = torch.randn(x.shape)
        x0 = x + eps * ones * t / ((t ** 2).sum(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-12)
    return x0.clamp(0, 1)


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g)


# ---------------------------------------------------------------- APGD vs torchattacks

@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_apgd_run_equals_torchattacks_step_for_step(model, loss, norm):
    """One run from the same start on the same batch: the same bits everywhere, and the losses that
    drive the step-size checkpoints are torchattacks' own."""
    x = images(8)
    defense = MODELS[model](cnn(), 8)
    y = AsModule(defense, x)(x).argmax(1)
    eps = NORMS[norm][1] / 2  # half the usual budget: some images resist
    atk = torchattacks.APGD(AsModule(defense, x), norm=NORMS[norm][0], eps=eps, steps=20, loss=loss)
    seen = []
    check = atk.check_oscillation

    def spy(losses, j, k, y5, k3=0.75):  # torchattacks' per-iteration losses at each checkpoint
        seen.append(torch.tensor(losses[:j + 1]))
        return check(losses, j, k, y5, k3)

    atk.check_oscillation = spy
    torch.manual_seed(5)
    x_best, robust, loss_best, x_adv = atk.attack_single_run(x, y)
    torch.manual_seed(5)
    out = apgd_run(defense, x, y, list(range(8)), torchattacks_start(x, None, eps, norm, 0, 0), LOSSES[loss], norm,
                   eps, steps=20)
    assert torch.equal(out["x_best"], x_best) and torch.equal(out["x_adv"], x_adv)
    assert torch.equal(out["robust"], robust) and torch.equal(out["loss_best"], loss_best)
    # 20 steps: intervals of int(0.22 * 20) = 4, then 3, 2 and 1 (the minimum): 14 checkpoints
    assert len(seen) == 14 and torch.equal(out["losses"], seen[-1])
    assert 0 < robust.sum() < 8  # the attack broke some images, not all
    assert len(out["step_sizes"].unique()) > 2  # step sizes were halved, more than once for some


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("norm", list(NORMS))
def test_apgd_restarts_and_keep_rules_equal_torchattacks(model, norm, monkeypatch):
    """perturb() with 3 restarts (only the images still classified correctly are attacked again, as
    upstream) and best_loss=True ('max-loss'), with torchattacks' random starts replayed in the order it
    draws them. l_2 agrees to float32 rounding only: torchattacks runs the model on the subset still
    attacked, our pipelines in chunks of a fixed size, and a batch of another size rounds differently
    in the last bit (l_inf's sign() hides that)."""
    monkeypatch.setattr(addt_attacks, "apgd_start", torchattacks_start)
    x = images(12)
    defense = MODELS[model](cnn(), 12)
    y = AsModule(defense, x)(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three start misclassified: never attacked, the clean image comes back
    tol = 0 if norm == "linf" else 1e-6
    for k, loss in enumerate(["ce", "dlr"]):
        eps = NORMS[norm][1] / 2
        atk = torchattacks.APGD(AsModule(defense, x), norm=NORMS[norm][0], eps=eps, steps=10, n_restarts=3, seed=3,
                                loss=loss)
        ref = atk(x, y)  # seeds torch with 3, then draws each restart's start
        torch.manual_seed(3)
        ours, broken, _ = apgd_attack(defense, x, y, list(range(12)), loss, norm, eps, 10, restarts=3)
        assert (ours - ref).abs().max() <= tol
        assert torch.equal(ours[:3], x[:3]) and broken[:3].all() and 0 < broken[3:].sum() < 9
        torch.manual_seed(11)  # best_loss=True does not seed: we seed for both
        ref = atk.perturb(x, y, best_loss=True)[1]
        torch.manual_seed(11)
        ours = apgd_attack(defense, x, y, list(range(12)), loss, norm, eps, 10, restarts=3, keep="max-loss")[0]
        assert (ours - ref).abs().max() <= tol


def test_apgd_records_keys_and_batch_invariance():
    """White-box EoT: the records do not depend on how the images are batched; starts are keyed and
    lie on the ball's surface (l_inf) or sphere (l_2)."""
    x = images(10)
    defense = Defense(toy_purify, cnn(), "white-box", chunk=16)
    y = torch.arange(10)
    runs = {}
    for bs in (2, 5):
        out, recs = [], []
        for lo in range(0, 10, bs):
            xa, r = apgd(defense, x[lo:lo + bs], y[lo:lo + bs], list(range(lo, lo + bs)), loss="dlr", steps=6,
                         restarts=2, eot=3, protocol="mean-2")
            out.append(xa)
            recs += r
        runs[bs] = torch.cat(out), recs
    assert torch.equal(runs[2][0], runs[5][0]) and runs[2][1] == runs[5][1]
    r = runs[2][1][0]
    assert r["attack"] == "apgd-dlr" and r["protocol"] == "mean-2" and r["keep"] == "misclassified"
    assert all(rec["linf"] <= 8 / 255 + 1e-6 for rec in runs[2][1])
    for norm, eps in [("linf", 8 / 255), ("l2", 0.5)]:
        start = addt_attacks.apgd_start(torch.full_like(x, 0.5), list(range(10)), eps, norm, 0, 0) - 0.5
        size = start.flatten(1).abs().max(1).values if norm == "linf" else start.flatten(1).norm(dim=1)
        assert torch.allclose(size, torch.full_like(size, eps), rtol=1e-5)
        again = addt_attacks.apgd_start(torch.full_like(x[3:5], 0.5), [3, 4], eps, norm, 0, 0) - 0.5
        assert torch.equal(again, start[3:5])


# ---------------------------------------------------------------- PGD: random start, trajectories

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_keyed_by_image(norm):
    x = images(10)
    defense = Defense(toy_purify, cnn(), "white-box", chunk=8)
    y = torch.arange(10)
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    runs = {}
    for bs in (2, 5):
        out, recs = [], []
        for lo in range(0, 10, bs):
            xa, r = pgd_eot(defense, x[lo:lo + bs], y[lo:lo + bs], list(range(lo, lo + bs)), eps, step, steps=2, eot=2,
                            norm=norm, random_start=True)
            out.append(xa)
            recs += r
        runs[bs] = torch.cat(out), recs
    assert torch.equal(runs[2][0], runs[5][0]) and runs[2][1] == runs[5][1]
    start = pgd_start(torch.full_like(x, 0.5), list(range(10)), eps, norm, 0) - 0.5
    size = start.flatten(1).abs().max(1).values if norm == "linf" else start.flatten(1).norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all() and size.min() > 0
    if norm == "linf":  # uniform in the cube: about half the coordinates beyond eps / 2
        assert 0.4 < (start.abs() > eps / 2).float().mean() < 0.6
    zero = pgd_eot(defense, x[:2], y[:2], eps=eps, step_size=step, steps=2, eot=2, norm=norm)[0]
    assert not torch.equal(zero, runs[2][0][:2])  # the default is the paper's zero start


def test_trajectory_values():
    x = images(4)
    defense = Defense(toy_purify, cnn(), "white-box", chunk=8)
    y = torch.arange(4)
    steps, eot = 3, 2
    traj = []
    x_adv, records = pgd_eot(defense, x, y, steps=steps, eot=eot, protocol="mean-3", trajectory=traj,
                             trajectory_deltas=2)
    _, with_logs = pgd_eot(defense, x, y, steps=steps, eot=eot, protocol="mean-3", trajectory=True)
    assert [t["index"] for t in traj] == [0, 1, 2, 3]
    assert [("delta" in t) for t in traj] == [True, True, False, False]
    for k, t in enumerate(traj):
        assert {n: t[n] for n in ("loss", "score", "linf", "l2")} == with_logs[k]["trajectory"]
        assert all(len(t[n]) == steps for n in ("loss", "score", "linf", "l2"))
        assert t["score"][-1] == records[k]["robust"] and abs(t["linf"][-1] - records[k]["linf"]) < 1e-7
    deltas = torch.stack([t["delta"] for t in traj[:2]], 1)  # (steps, 2, C, H, W)
    assert deltas.shape == (steps, 2, 3, 8, 8)
    assert torch.allclose(deltas[-1], x_adv[:2] - x[:2])
    for s in range(steps):
        d = deltas[s].flatten(1)
        assert torch.allclose(torch.tensor([t["linf"][s] for t in traj[:2]]), d.abs().max(1).values)
        assert torch.allclose(torch.tensor([t["l2"][s] for t in traj[:2]]), d.norm(dim=1))
        x_s = x[:2] if s == 0 else x[:2] + deltas[s - 1]  # the iterate step s + 1 took its gradient at
        loss = defense.eot_gradient(x_s, y[:2], [0, 1], s, eot)[1].mean(0)
        assert torch.allclose(loss, torch.tensor([t["loss"][s] for t in traj[:2]]), atol=1e-5)
        m = measure(defense, x[:2] + deltas[s], y[:2], [0, 1], EVAL, s + 1, "mean-3")
        assert m["score"].tolist() == [t["score"][s] for t in traj[:2]]
    with pytest.raises(ValueError, match="list"):
        pgd_eot(defense, x, y, steps=1, trajectory=True, trajectory_deltas=1)
    with pytest.raises(ValueError, match="track"):
        pgd_eot(defense, x, y, steps=1, track="worst")


def test_records_fields_and_bare_classifier_prediction():
    x = images(3)
    clf = cnn()
    x_adv, records = pgd_eot(Defense(toy_purify, clf, "dw-both", chunk=4), x, torch.arange(3), steps=1, eot=1)
    assert [r["clf_pred"] for r in records] == clf(x_adv).argmax(1).tolist()  # official all_cls_acc
    r = records[0]
    assert {"index", "label", "protocol", "clean_pred", "clean_correct_frac", "clean", "pred", "robust_correct_frac",
            "robust", "loss", "linf", "l2", "clf_pred", "track", "iterate"} <= set(r)
    assert r["protocol"] == "single" and r["track"] == "final" and r["iterate"] == 1


def test_nan_logits_are_refused():
    nan_clf = lambda x: x.flatten(1)[:, :10] * math.nan  # noqa: E731
    with pytest.raises(NonFiniteError, match="non-finite"):
        apgd(Defense(None, nan_clf), images(2), torch.arange(2), steps=2)


# ---------------------------------------------------------------- gradient checkpointing: 'auto'

class SinPurifier:
    """Three network calls of torch.sin (each saves its input); records the checkpoint switch it sees."""

    def __init__(self):
        self.grad_checkpoint, self.seen = False, []

    def __call__(self, x, noise):
        self.seen.append(self.grad_checkpoint)
        for _ in range(3):
            x = torch.sin(x + 0 * noise(0, x))
        return x


@pytest.mark.parametrize("budget,on", [(5_000, True), (10 ** 12, False), (None, True)])
def test_grad_checkpoint_auto_decides_once_from_the_graph_size(budget, on, monkeypatch):
    monkeypatch.setattr(addt_attacks, "available_memory", lambda device: budget)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).requires_grad_(False)
    purifier = SinPurifier()
    defense = Defense(purifier, clf, chunk=8)
    assert defense.checkpointing is None  # decided at the first gradient
    x, y = torch.rand(5, 3, 4, 4), torch.arange(5)
    defense.predict(x, list(range(5)), EVAL)
    assert defense.checkpointing is None and purifier.seen == [False]
    g, _, _ = defense.eot_gradient(x, y, list(range(5)), 0, 2)
    # the 3 sin inputs, float32, one chunk of 8; the frozen linear layer saves its weight (not counted)
    # and not its input (no weight gradient is needed)
    assert defense.checkpoint_info["saved_bytes_per_chunk"] == 3 * 8 * 48 * 4
    assert defense.checkpoint_info["available_bytes"] == budget
    assert defense.checkpointing is on and purifier.seen[-1] is on  # the gradient ran as decided
    defense.eot_gradient(x, y, list(range(5)), 1, 2)
    assert defense.checkpoint_info["on"] is on and purifier.seen[-1] is on  # decided once
    defense.predict(x, list(range(5)), EVAL)
    assert purifier.seen[-1] is False  # no graph, no checkpointing
    assert torch.equal(g, Defense(SinPurifier(), clf, chunk=8, grad_checkpoint=False).eot_gradient(
        x, y, list(range(5)), 0, 2)[0])


def test_grad_checkpoint_explicit_settings():
    for request, on in [(True, True), ("on", True), (False, False), ("off", False)]:
        defense = Defense(SinPurifier(), nn.Flatten(), chunk=4, grad_checkpoint=request)
        defense.eot_gradient(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), [0, 1], 0, 1)
        assert defense.checkpoint_info == {"request": on, "on": on}
    bare = Defense(lambda x, noise: x, nn.Flatten(), chunk=4)
    bare.eot_gradient(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), [0, 1], 0, 1)
    assert bare.checkpointing is False and "no grad_checkpoint switch" in bare.checkpoint_info["reason"]
    with pytest.raises(ValueError, match="grad_checkpoint"):
        Defense(None, nn.Flatten(), grad_checkpoint="sometimes")


# ---------------------------------------------------------------- the module docstring's example

def test_docstring_example_runs(capsys):
    doc = addt_attacks.__doc__
    block = re.search(r"Example[^\n]*\n\n((?: {4}.*\n|\n)+)", doc).group(1)
    code = "\n".join(line[4:] for line in block.splitlines())
    assert "Defense(purify, classifier" in code and code.count("\n") <= 12
    exec(compile(code, "addt_attacks docstring", "exec"), {})
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].startswith("white-box ") and lines[1].startswith("dw-both ")
    assert all(0 <= float(line.split()[1]) <= 100 for line in lines[:2])
