"""Evaluation protocols, track='best', AutoAttack's rand version (upstream and fixed) and the summaries,
checked on toy stochastic defences whose answers are known in closed form.

Every draw is keyed, so each check below runs one fixed sample: the bounds (4 standard errors around
the closed form) decide once and for all, they do not flake."""
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn as nn

from addt_attacks import (Defense, autoattack_rand, parse_protocol, pgd_eot, protocol_score, summarize_records,
                          wilson_interval)

PHI = NormalDist()


def binom_tail(k, n, p):
    """P(Binomial(n, p) >= k)."""
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


def se(p, n):
    """Standard error of a mean of n scores in [0, 1] with mean p (at most that of a Bernoulli)."""
    return math.sqrt(max(p * (1 - p), 1e-4) / n)


# ---------------------------------------------------------------- toy defences

def coin_defense(p, setting="white-box"):
    """Right with probability p per purification, whatever the input: the purifier hands the classifier
    one standard normal z per purification, and class 0 (every label) wins while z < Phi^-1(p)."""
    c = PHI.inv_cdf(p)

    def purify(x, noise):
        return 0 * x + noise(0, x)

    def classifier(x):
        z = x[:, 0, 0, 0]
        return torch.stack([c - z, torch.zeros_like(z), torch.full_like(z, -5.0)], 1)

    return Defense(purify, classifier, setting, chunk=1024)


EPS = 8 / 255
A = 6 / EPS


def cliff_defense(r):
    """Images are constant 0.5 with label 0; the purifier shifts an image's mean by -z / A (z ~ N(0, 1)
    per purification) and class 0 wins while A (0.5 + eps - mean) + Phi^-1(r) > z. So the clean image
    is right with probability Phi(6 + Phi^-1(r)) (1 to 1e-9 for r = 0.5) and the image moved by +eps
    everywhere, where one l_inf APGD step lands, with probability r."""
    c = PHI.inv_cdf(r)

    def purify(x, noise):
        return x - noise(0, x)[:, :1, :1, :1] / A

    def classifier(x):
        margin = A * (0.5 + EPS - x.mean((1, 2, 3))) + c
        return torch.stack([margin, torch.zeros_like(margin), torch.full_like(margin, -5.0)], 1)

    return Defense(purify, classifier, chunk=1024)


def constant_images(n):
    return torch.full((n, 3, 4, 4), 0.5), torch.zeros(n, dtype=torch.long)


# ---------------------------------------------------------------- protocols

def test_parse_protocol():
    assert parse_protocol("single") == ("single", 1)
    assert parse_protocol("mean-20") == ("mean", 20)
    assert parse_protocol("worst-10") == ("worst", 10)
    assert parse_protocol("majority-5") == ("majority", 5)
    for bad in ["", "mean", "mean-", "mean-0", "worst-x", "single-3", "median-5", "mean-2.5", "worst--1"]:
        with pytest.raises(ValueError, match="protocol"):
            parse_protocol(bad)


def test_protocol_scores_by_hand():
    correct = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)  # (draws, images)
    assert protocol_score(correct, "single").tolist() == [1, 1, 0, 0]
    assert protocol_score(correct, "worst-3").tolist() == [1, 0, 0, 0]
    assert protocol_score(correct, "majority-3").tolist() == [1, 1, 1, 0]
    assert protocol_score(correct, "mean-2").tolist() == [1, 0.5, 0.5, 0]
    with pytest.raises(ValueError, match="needs 4 draws"):
        protocol_score(correct, "mean-4")


@pytest.mark.parametrize("protocol", ["single", "mean-5", "worst-5", "majority-5"])
def test_protocols_on_a_coin_defense(protocol):
    """A defence right with probability p per draw, independently: single and mean-K ~ p,
    worst-N ~ p^N, majority-N ~ P(Binomial(N, p) > N / 2); for the clean and the final images."""
    p, n = 0.7, 400
    name, k = parse_protocol(protocol)
    expect = {"single": p, "mean": p, "worst": p ** k, "majority": binom_tail(k // 2 + 1, k, p)}[name]
    x, y = constant_images(n)
    _, records = pgd_eot(coin_defense(p), x, y, steps=1, eot=1, protocol=protocol)
    s = summarize_records(records)
    assert s["protocol"] == protocol and all(r["protocol"] == protocol for r in records)
    for key in ("clean_accuracy", "robust_accuracy"):
        assert abs(s[key] / 100 - expect) < 4 * se(expect, n), (key, s[key], expect)
    on_grid = lambda v: abs(v * k - round(v * k)) < 1e-5  # noqa: E731  (float32 fractions j / k)
    assert all(on_grid(r["robust_correct_frac"]) for r in records)  # the fraction over the draws stays recorded
    if name == "mean":
        assert all(r["robust"] == r["robust_correct_frac"] for r in records)
    else:
        assert {r["robust"] for r in records} <= {0.0, 1.0}
    if name == "worst":
        assert all((r["robust"] == 1) == (r["robust_correct_frac"] == 1) for r in records)
    if name == "majority":
        assert all((r["robust"] == 1) == (r["robust_correct_frac"] > 0.5) for r in records)


def test_eval_draws_beyond_the_protocol_only_add_to_the_fractions():
    x, y = constant_images(8)
    _, records = pgd_eot(coin_defense(0.5), x, y, steps=1, eot=1, eval_draws=4, protocol="single")
    assert {r["robust_correct_frac"] for r in records} <= {0, 0.25, 0.5, 0.75, 1}
    assert all(r["robust"] == float(r["pred"] == r["label"]) for r in records)  # single = draw 0


# ---------------------------------------------------------------- track="best"

@pytest.fixture(scope="module")
def noisy_defense():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    clf = clf.eval().requires_grad_(False)
    return Defense(lambda x, noise: (x + 0.25 * noise(0, x)).clamp(0, 1), clf, "white-box", chunk=64)


@pytest.mark.parametrize("protocol", ["single", "mean-3", "worst-3"])
def test_best_never_reports_more_than_final(noisy_defense, protocol):
    """Same run, same keys: 'best' picks among iterates whose last is measured exactly as 'final'
    measures it, so per image its score is at most final's."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, 3, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    kw = dict(eps=4 / 255, step_size=1 / 255, steps=4, eot=2, protocol=protocol)
    x_final, final = pgd_eot(noisy_defense, x, y, **kw)
    x_best, best = pgd_eot(noisy_defense, x, y, track="best", **kw)
    assert [r["robust_final"] for r in best] == [r["robust"] for r in final]
    assert all(b["robust"] <= f["robust"] for b, f in zip(best, final))
    assert summarize_records(best)["robust_accuracy"] <= summarize_records(final)["robust_accuracy"]
    assert [r["clean"] for r in best] == [r["clean"] for r in final]
    assert all(r["track"] == "best" and 0 <= r["iterate"] <= 4 for r in best)
    for k, r in enumerate(best):  # the returned image is the kept iterate: the clean one for iterate 0
        if r["iterate"] == 0:
            assert torch.equal(x_best[k], x[k]) and r["robust"] == r["clean"]
        if r["iterate"] == 4:
            assert torch.equal(x_best[k], x_final[k])
    assert any(r["iterate"] not in (0, 4) for r in best) or protocol != "single"


# ---------------------------------------------------------------- AutoAttack, rand version

def test_autoattack_on_a_coin_defense():
    """Right with probability p per pass whatever the input: upstream's flags survive three one-pass
    checks (clean, after APGD-CE, after APGD-DLR): p^3. The fix keeps the minimum of three fractions
    of 20 draws (a fraction at 0 stops the attacks, which leaves the minimum at 0):
    E = sum_k P(F >= k / 20)^3 / 20 with F ~ Binomial(20, p) / 20."""
    p, n = 0.8, 1000
    x, y = constant_images(n)
    upstream = summarize_records(autoattack_rand(coin_defense(p), x, y, version="upstream", eot=2, steps=5)[1])
    fixed = summarize_records(autoattack_rand(coin_defense(p), x, y, version="fixed", eot=2, steps=5)[1])
    expect_fixed = sum(binom_tail(k, 20, p) ** 3 for k in range(1, 21)) / 20
    assert abs(upstream["autoattack_robust_accuracy"] / 100 - p ** 3) < 4 * se(p ** 3, n)
    assert abs(fixed["autoattack_robust_accuracy"] / 100 - expect_fixed) < 4 * se(expect_fixed, n)
    assert abs(upstream["autoattack_clean_accuracy"] / 100 - p) < 4 * se(p, n)
    assert upstream["version"] == "upstream" and fixed["version"] == "fixed"


def test_fixed_autoattack_removes_upstreams_overestimate():
    """The cliff defence: one APGD step lands where a purification is right with probability r.
    Upstream flags an image broken by ONE pass and stops there; an image that passes both checks keeps
    x_adv = its clean image, so evaluating the returned x_adv again (what DBP papers report) gives
    q^2 + (1 - q^2) r with q = a r + 1 - a, where a = 1 - r^steps is the chance that APGD saw a
    misclassification (else it returns the clean image). The fix keeps every candidate whose fraction
    of 20 draws is lower, so x_adv is adversarial for (almost) every image: r on evaluation, and its
    own number is E[min(U_ce, U_dlr)], U = F ~ Binomial(20, r) / 20 with probability a, else 1."""
    r, n, steps = 0.5, 1000, 8
    a = 1 - r ** steps
    q = a * r + 1 - a
    x, y = constant_images(n)
    up_x, up = autoattack_rand(cliff_defense(r), x, y, version="upstream", eot=2, steps=steps)
    fx_x, fx = autoattack_rand(cliff_defense(r), x, y, version="fixed", eot=2, steps=steps)
    up_s, fx_s = summarize_records(up), summarize_records(fx)
    tail = [a * binom_tail(k, 20, r) + 1 - a for k in range(1, 21)]
    closed = {"upstream flags": (up_s["autoattack_robust_accuracy"], q ** 2),
              "upstream re-evaluated": (up_s["robust_accuracy"], q ** 2 + (1 - q ** 2) * r),
              "fixed fraction": (fx_s["autoattack_robust_accuracy"], sum(t ** 2 for t in tail) / 20),
              "fixed re-evaluated": (fx_s["robust_accuracy"], r)}
    for name, (got, expect) in closed.items():
        assert abs(got / 100 - expect) < 4 * se(expect, n), (name, got, expect)
    # the published number (upstream, re-evaluated) overestimates; the fix brings it to r
    assert up_s["robust_accuracy"] - fx_s["robust_accuracy"] > 8
    # upstream keeps the clean image for every image it flags robust; the fix an adversarial one
    flagged = [k for k, rec in enumerate(up) if rec["aa_robust"] == 1]
    assert flagged and all(up[k]["aa_kept"] == "clean" and torch.equal(up_x[k], x[k]) for k in flagged)
    assert sum(rec["aa_kept"] != "clean" for rec in fx) > 0.99 * n
    assert all(abs(rec["linf"] - EPS) < 1e-6 for rec in fx if rec["aa_kept"] != "clean")
    assert {rec["aa_kept"] for rec in fx} <= {"clean", "apgd-ce", "apgd-dlr"}
    # a fraction only ever goes down, and an image at 0 is attacked no more
    assert all(rec["aa_clean"] >= rec["aa_after_ce"] >= rec["aa_after_dlr"] == rec["aa_robust"] for rec in fx)


# ---------------------------------------------------------------- summaries

def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and abs(hi - 27.75) < 0.01  # the textbook value
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 23.66) < 0.01 and abs(hi - 76.34) < 0.01
    # fractional successes (sums of mean-K fractions) fall between their integer neighbours
    assert wilson_interval(2, 10)[0] < wilson_interval(2.5, 10)[0] < wilson_interval(3, 10)[0]
    assert wilson_interval(7, 0) == (0.0, 100.0)
    lo, hi = wilson_interval(512, 1024)
    assert lo < 50 < hi and hi - lo < 6.2


def test_summarize_records_fields():
    rows = [(1, 0.5, 1, 0), (1, 0, 0, 0), (0.5, 0.5, 1, 1), (1, 1, 1, 0)]  # clean, robust, pred, clf_pred
    recs = [{"index": i, "label": 1, "protocol": "mean-2", "clean": c, "robust": r, "clean_pred": 1, "pred": p,
             "clf_pred": q} for i, (c, r, p, q) in enumerate(rows)]
    s = summarize_records(recs)
    assert s["n"] == 4 and s["protocol"] == "mean-2"
    assert s["clean_accuracy"] == 87.5 and s["robust_accuracy"] == 50.0
    assert s["robust_accuracy_draw0"] == 75.0 and s["classifier_accuracy_adv"] == 25.0
    assert s["robust_ci"][0] < 50 < s["robust_ci"][1]
    with pytest.raises(ValueError, match="several protocols"):
        summarize_records(recs + [dict(recs[0], protocol="single")])
