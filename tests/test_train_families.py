"""ADDT for every family (train_addt.py --model ddpm|vpsde|edm): one training step against the formulas
written out here (independently of train_addt.py), CGPO raising the classifier's loss, exact resume and
each family's export loading back. Tiny random models of attack.make_smoke_inputs, on the CPU."""
import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_addt
from addt_diffusion import linear_alpha_bar, load_diffusion_model
from models import load_classifier


@pytest.fixture(scope="module")
def inputs(smoke_inputs):
    return smoke_inputs


def scales_by_hand(family, t):
    """(a_t, s_t) of x_t = a x0 + s eps, from the papers' formulas in float64."""
    t = t.double()
    if family == "ddpm":
        ab = torch.from_numpy(__import__("numpy").cumprod(1 - __import__("numpy").linspace(1e-4, 0.02, 1000)))[t.long()]
        return ab.sqrt(), (1 - ab).sqrt()
    if family == "vpsde":  # score_sde VPSDE(0.1, 20): log mean = -t^2 (20 - 0.1) / 4 - 0.1 t / 2
        mean = torch.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t)
        return mean, torch.sqrt(1 - mean ** 2)
    return torch.ones_like(t), t  # EDM: x_t = x0 + sigma eps


class Recorder(nn.Module):
    """A tiny deterministic network that records the labels (t, t * 999 or sigma) it is called with."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.labels = []

    def forward(self, x, label):
        self.labels.append(torch.as_tensor(label).detach().clone())
        return self.conv(x) * 0.5 + 0.01 * torch.as_tensor(label, dtype=x.dtype).view(-1, 1, 1, 1)


@pytest.mark.parametrize("family", ["ddpm", "vpsde", "edm"])
def test_one_step_equals_the_formulas(family, monkeypatch):
    """train_step with a fixed CGPO delta: t, lambda_t, the noise mixture, the network's label and the loss
    recomputed here from the formulas, with the same random draws (t first, then eps)."""
    torch.manual_seed(0)
    x0, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    delta = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(train_addt, "cgpo", lambda *a: (delta, torch.tensor(1.0), None))
    args = train_addt.parse_args(["--model", family, f"--{family}", "x", "--classifier", "x", "--cgpo-iters", "1"])
    net = Recorder()
    fam = train_addt.FAMILIES[family]("cpu")
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    ema = train_addt.EMA(net)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 10))
    stats = train_addt.train_step(net, net, fam, classifier, ema, opt, [(x0, y)], args,
                                  torch.Generator().manual_seed(3), contextlib.nullcontext)
    g = torch.Generator().manual_seed(3)  # the draws of train_step, in its order
    if family == "ddpm":
        t = torch.randint(0, 1000, (4,), generator=g)
    elif family == "vpsde":
        t = torch.rand(4, generator=g) * (1 - 1e-3) + 1e-3
    else:
        t = torch.exp(torch.randn(4, generator=g) * 1.2 - 1.2)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    a, s = scales_by_hand(family, t)
    lam = torch.clamp(0.03 * a / s, 0, 0.3)  # eq. 7
    view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    eps_mix = view(torch.sqrt(1 - lam ** 2)) * eps + view(lam) * delta  # eq. 6
    x_t = (view(a) * x0 + view(s) * eps_mix).float()
    label = {"ddpm": t, "vpsde": t * 999, "edm": t}[family]
    torch.testing.assert_close(net.labels[0].double(), label.double(), rtol=1e-6, atol=0)
    with torch.no_grad():
        out = net(x_t, label.float()).double()
    if family == "edm":  # D predicts x0; EDM's weight (sigma^2 + 0.25) / (0.5 sigma)^2
        weight = (t ** 2 + 0.25) / (0.5 * t) ** 2
        want = (view(weight) * (out - x0) ** 2).mean()
    else:  # eps-prediction against the mixed noise
        want = ((out - eps_mix) ** 2).mean()
    assert stats["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert 0 <= lam.min() and lam.max() <= 0.3


@pytest.mark.parametrize("family", ["vpsde", "edm"])
def test_cgpo_raises_the_classifier_loss(family, inputs):
    """As for DDPM: CE of classifier((x0_hat + 1) / 2) with CGPO's final delta vs its starting N(0, I), paired
    over 8 fixed eps draws, at small t (sigma) where the perturbation reaches x0_hat."""
    from addt_data import load_split, to_float
    net = load_diffusion_model(family, inputs[family]).train()
    classifier = load_classifier(inputs["classifier"]).requires_grad_(False)
    data = load_split(inputs["data"], "train")
    x0, y = 2 * to_float(data.images[:8]) - 1, data.labels[:8]
    fam = train_addt.FAMILIES[family]("cpu")
    t = torch.linspace(0.01, 0.08, 8) if family == "vpsde" else torch.linspace(0.02, 0.2, 8)
    a, s = fam.scales(t)
    args = train_addt.parse_args(["--model", family, f"--{family}", "x", "--classifier", "x"])
    lam = train_addt.lambda_t(a, s, args.lambda_unit, args.lambda_min, args.lambda_max)
    delta, _, _ = train_addt.cgpo(fam, net, classifier, x0, y, t, lam, args, torch.Generator().manual_seed(0),
                               contextlib.nullcontext)
    start = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def ce(d):
        g, out = torch.Generator().manual_seed(123), []
        for _ in range(8):
            x_t = train_addt.noisy(x0, train_addt.mix_noise(torch.randn(x0.shape, generator=g), d, lam), a, s)
            x0_hat, _ = fam.predict(net, x_t, t, a, s)
            out.append(F.cross_entropy(classifier((x0_hat + 1) / 2), y).item())
        return sum(out) / len(out)

    assert ce(delta) > ce(start) + 0.05, (ce(start), ce(delta))


@pytest.mark.parametrize("family", ["vpsde", "edm"])
def test_resume_is_exact_and_the_export_loads(family, inputs, tmp_path, killed_at):
    flags = lambda out, *more: ["--model", family, f"--{family}", inputs[family], "--classifier", inputs["classifier"],  # noqa: E731
                                "--data", inputs["data"], "--out", str(out), "--device", "cpu", "--global-batch", "2",
                                "--cgpo-iters", "1", "--max-steps", "3", "--ckpt-every", "2", "--log-every", "1", *more]
    net, ema = train_addt.main(flags(tmp_path / "whole"))
    want_p = {"vpsde": 0.1, "edm": 0.13}[family]  # --dropout's default per family, on every Dropout
    assert {m.p for m in net.modules() if isinstance(m, nn.Dropout)} == {want_p}
    restore = killed_at(train_addt, "train_step", 3)
    with pytest.raises(KeyboardInterrupt):
        train_addt.main(flags(tmp_path / "parts"))
    restore()
    train_addt.main(flags(tmp_path / "parts", "--resume"))
    a, b = (torch.load(tmp_path / p / "ckpt.pt", weights_only=True) for p in ("whole", "parts"))
    for sd_a, sd_b in ((a["model"], b["model"]), (a["ema"]["model"], b["ema"]["model"])):
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    exported = load_diffusion_model(family, str(tmp_path / "whole" / "ema")).state_dict()
    mine = ema.model.state_dict()
    assert exported.keys() == mine.keys() and all(torch.equal(exported[k], mine[k]) for k in mine)


def test_dropout_reaches_every_dropout_of_the_cifar10_unet():
    """SPEC.md: 0.1 on all 28 Dropout modules of the CIFAR-10 UNet, the attention outputs' included."""
    from models.unet import DDPM_CIFAR10_CONFIG, UNet
    with torch.device("meta"):
        unet = UNet(DDPM_CIFAR10_CONFIG)
    train_addt.set_dropout(unet, 0.1)
    ps = [m.p for m in unet.modules() if isinstance(m, nn.Dropout)]
    assert len(ps) == 28 and set(ps) == {0.1}
    assert sum(1 for n, m in unet.named_modules() if isinstance(m, nn.Dropout) and "attentions" in n) == 6


def test_mse_guidance_is_the_fresh_gaussian_part():
    """--guidance mse maximises MSE(eps_theta(x_t, t), eps) with eps the fresh Gaussian noise (official
    train_ADDT_l2_loss_for_ablation.py), not the mixed noise and not the x0 error."""
    g = torch.Generator().manual_seed(0)
    x0_hat, eps_hat, eps = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    loss = train_addt.guidance_loss(x0_hat, eps_hat, eps, None, None, "mse")
    assert loss.item() == pytest.approx(((eps_hat - eps) ** 2).mean().item())
    assert linear_alpha_bar().shape == (1000,) and math.isfinite(loss.item())
