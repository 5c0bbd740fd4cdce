"""EDM denoiser, its loaders and ADDT's EDM purification against outputs of the official code.

Fixtures (DATA written by NVlabs/edm and LYMDLUT/ADDT; see ../shared/fixtures/README.md section 2):
  tests/fixtures/edm/*   copied from ../shared/fixtures/edm/: the small net (model_channels 16,
                         num_blocks 1) as an EDM training snapshot (module sources replaced by
                         placeholders) and as ADDT's exported state dict, D(x, sigma) of that net,
                         ADDT's purify at sigma_max 0.5 / 50 steps / churn 6 with its random draws,
                         and the state-dict shapes of the real and the small config.
"""
import json
import os
import pickle
import sys

import pytest
import torch

from addt_diffusion import edm_purifier, edm_purify, edm_schedule, fixed_noise
from models import safe_pickle
from models.edm import EDMPrecond, VPPrecond, load_edm, songunet_config

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "edm")
SNAPSHOT = os.path.join(FIX, "network-snapshot-000000.pkl")
EXPORT = os.path.join(FIX, "edm_cifar_uncond_small.pth")
# As small as the architecture allows, so float64 gradient checks stay fast: 8x8 images, two levels,
# one block per level, attention at 4x4 (and in the bottleneck), augmentation labels on.
TINY = dict(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], augment_dim=9, dropout=0.0)


def load_fixture(name):
    return torch.load(os.path.join(FIX, name), weights_only=True)


@pytest.fixture(scope="module")
def net():
    return load_edm(EXPORT)


@pytest.fixture(scope="module")
def purify_ref():
    return load_fixture("addt_purify_sigma0.5_50steps.pt")


def tiny_net(dtype=torch.float32, seed=0):
    """A random tiny EDMPrecond, every weight perturbed so that no near-zero init hides a term."""
    torch.manual_seed(seed)
    net = EDMPrecond(**TINY).eval().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return net


class Counted:
    """The denoiser, with the sigma of every call recorded."""

    def __init__(self, net):
        self.net, self.sigmas = net, []

    def __call__(self, x, sigma):
        self.sigmas.append(sigma)
        return self.net(x, sigma)


def draws_recorder(draws):
    asked = []

    def noise(k, like):
        asked.append(k)
        return draws[k]
    return noise, asked


# ---------------------------------------------------------------- architecture

@pytest.mark.parametrize("config", ["full", "small"])
def test_state_dict_matches_official(config):
    ref = json.load(open(os.path.join(FIX, f"{config}_config_state_dict_shapes.json")))
    kwargs = {k: v for k, v in ref["network_kwargs"].items() if k != "class_name"}
    with torch.device("meta"):
        net = EDMPrecond(**ref["interface_kwargs"], **kwargs)
    sd = net.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in ref["state_dict"]]
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters"]  # 55,733,891 / 393,331
    buffers = [k for k, _ in net.named_buffers()]
    assert buffers == ref.get("buffers", buffers) and len(buffers) == 8
    assert all(k.endswith("resample_filter") for k in buffers)
    assert len(sd) == len(list(net.parameters())) + len(buffers)  # 425 / 209 keys


def test_refuses_what_it_does_not_implement():
    for bad in [dict(model_type="DhariwalUNet"), dict(label_dim=10), dict(embedding_type="fourier"),
                dict(encoder_type="residual"), dict(decoder_type="skip")]:
        with pytest.raises(ValueError, match="not implemented"), torch.device("meta"):
            EDMPrecond(**{**TINY, **bad})


# ---------------------------------------------------------------- loaders

def test_pickle_and_export_give_the_same_weights(net):
    from_pickle = load_edm(SNAPSHOT)
    assert type(from_pickle) is EDMPrecond and not from_pickle.training and not net.training
    export = torch.load(EXPORT, weights_only=True)
    for sd in (from_pickle.state_dict(), net.state_dict()):
        assert sd.keys() == export.keys()
        assert all(torch.equal(sd[k], export[k]) for k in export)
    config = songunet_config(export)  # what the state-dict loader reads off the shapes
    assert config == dict(img_resolution=32, img_channels=3, model_channels=16, channel_mult=[2, 2, 2], num_blocks=1,
                          attn_resolutions=[16], channel_mult_emb=4, channel_mult_noise=1, augment_dim=9,
                          resample_filter=[1.0, 1.0])


def test_pickle_loader_runs_no_code(tmp_path, monkeypatch):
    # (i) the fixture's embedded module sources are placeholders: nothing from the file can be imported or run
    meta = safe_pickle.load(SNAPSHOT)["ema"]._stub_args[0]
    assert meta["module_src"].startswith("# [fixture]") and meta["class_name"] == "EDMPrecond"
    load_edm(SNAPSHOT)
    assert not {"training", "torch_utils", "dnnlib"} & set(sys.modules)

    # (ii) a pickle whose object would run a shell command when unpickled
    class Evil:
        def __reduce__(self):
            return os.system, ("touch MARKER",)
    path = tmp_path / "network-snapshot-evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Evil()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"not one of EDMPrecond, VPPrecond") as e:
        load_edm(str(path))
    assert "system" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "MARKER").exists()


def test_loader_errors(tmp_path, net):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_edm(str(tmp_path / "missing.pkl"))
    text = tmp_path / "notes.pkl"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not an EDM checkpoint"):
        load_edm(str(text))
    sd = dict(net.state_dict())
    bad = {**sd, "model.enc.16x16_block0.conv0.weight": sd["model.enc.16x16_block0.conv0.weight"].clone()}
    bad["model.enc.16x16_block0.conv0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"weight model\.enc\.16x16_block0\.conv0\.weight holds NaN"):
        load_edm(str(tmp_path / "nan.pth"))
    torch.save({k: v for k, v in sd.items() if "map_layer1" not in k}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="model.map_layer1"):
        load_edm(str(tmp_path / "cut.pth"))
    torch.save({"model.map_label.weight": torch.zeros(16, 10), **sd}, tmp_path / "cond.pth")
    with pytest.raises(ValueError, match="class-conditional"):
        load_edm(str(tmp_path / "cond.pth"))
    torch.save({"weights": sd}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither an EDM training pickle"):
        load_edm(str(tmp_path / "other.pth"))


# ---------------------------------------------------------------- the denoiser D(x, sigma)

def test_denoiser_matches_official(net):
    ref = load_fixture("denoiser_outputs.pt")
    with torch.no_grad():
        for i, sigma in enumerate(ref["sigmas"]):  # 0-d sigma, broadcast over the batch
            torch.testing.assert_close(net(ref["x"][i], sigma), ref["D"][i], rtol=0, atol=1e-5)
        sigma = ref["sigma_mixed"]  # one sigma per sample
        torch.testing.assert_close(net(ref["x_mixed"], sigma), ref["D_mixed"], rtol=0, atol=1e-5)
        c_noise = sigma.log() / 4
        torch.testing.assert_close(c_noise, ref["c_noise_mixed"], rtol=0, atol=1e-6)
        c_in = 1 / (0.25 + sigma ** 2).sqrt()
        F_x = net.model(c_in[:, None, None, None] * ref["x_mixed"], c_noise)
        torch.testing.assert_close(F_x, ref["F_mixed"], rtol=0, atol=1e-5)
        D_aug = net(ref["x"][2], torch.tensor(0.5), augment_labels=ref["augment_labels"])
        torch.testing.assert_close(D_aug, ref["D_aug_sigma0p5"], rtol=0, atol=1e-5)


def test_vp_preconditioning(net):
    """VPPrecond: the baseline VP network's D = x - sigma F(x / sqrt(1 + sigma^2), 999 t(sigma))."""
    vp = load_edm(EXPORT, precond="VPPrecond")
    assert type(vp) is VPPrecond
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)
    # EDM's VP range, computed in float32 as EDM does (exp(1e-6) - 1 rounds: 0.00098, not 0.0010)
    assert abs(vp.sigma_max - 152.167) < 1e-3 and abs(vp.sigma_min - 0.0009765625) < 1e-9
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.05, 2.0])
    with torch.no_grad():
        F_x = net.model(x / (1 + sigma[:, None, None, None] ** 2).sqrt(), 999 * vp.sigma_inv(sigma))
        torch.testing.assert_close(vp(x, sigma), x - sigma[:, None, None, None] * F_x)


# ---------------------------------------------------------------- ADDT's EDM purification

def test_schedule_matches_addt(purify_ref):
    t_steps, gamma, t_hat, churn = edm_schedule(**purify_ref["settings"])
    assert torch.equal(t_steps, purify_ref["t_steps"]) and torch.equal(t_hat, purify_ref["t_hat"])
    assert torch.equal(gamma, purify_ref["gamma"])
    assert torch.equal(churn, (t_hat ** 2 - t_steps[:-1] ** 2).sqrt() * 1.007)


def test_purify_matches_addt(net, purify_ref):
    """ADDT's purify draws with randn_like after torch.manual_seed(30): the same draws from a generator."""
    ref = purify_ref
    purifier = edm_purifier(net)  # the defaults are ADDT's edm_run_*.sh settings
    assert purifier.settings == ref["settings"] and purifier.info["model_calls"] == 99
    g = torch.Generator().manual_seed(ref["seed_torch_manual_seed"])
    draws = [torch.randn(ref["x0_01"].shape, generator=g) for _ in range(51)]
    assert torch.equal(draws[0], ref["noise_global"]) and torch.equal(torch.stack(draws[1:]), ref["reverse_noise"])
    noise, asked = draws_recorder(draws)
    counted, trace = Counted(net), []
    with torch.no_grad():
        out = edm_purify(counted, ref["x0_01"], noise, **ref["settings"], trace=trace)
    assert asked == list(range(51))
    assert len(counted.sigmas) == 99 and torch.equal(torch.stack(counted.sigmas), ref["net_call_sigmas"])
    torch.testing.assert_close(out, ref["x_purified_01"], rtol=0, atol=1e-5)
    torch.testing.assert_close((trace[-1] + 1) / 2, ref["x_purified_pre_clamp"], rtol=0, atol=1e-5)
    assert len(trace) == 101
    torch.testing.assert_close(trace[0], ref["x_in"] + 0.5 * ref["noise_global"], rtol=0, atol=1e-6)
    for j, i in enumerate(ref["x_hat_step_indices"].tolist()):
        torch.testing.assert_close(trace[1 + 2 * i], ref["x_hat"][j], rtol=0, atol=1e-5)


def test_purify_lock_matches_addt(net, purify_ref):
    """purify_lock: noise_global and reverse_noise[i] given (ADDT draws 1000 reverse noises; extras go unused)."""
    ref = purify_ref
    extra = torch.randn(3, *ref["x0_01"].shape)
    purifier = edm_purifier(net)
    with torch.no_grad():
        out = purifier(ref["x0_01"], (ref["noise_global"], torch.cat([ref["reverse_noise"], extra])))
    torch.testing.assert_close(out, ref["x_purified_01"], rtol=0, atol=1e-5)
    with torch.no_grad():  # EDM-ODE: the churn noise is still drawn, and multiplied by 0
        out = edm_purifier(net, S_churn=0)(ref["x0_01"], fixed_noise([ref["noise_global"], *ref["reverse_noise"]]))
    torch.testing.assert_close(out, ref["x_purified_01_nochurn"], rtol=0, atol=1e-5)


def test_purify_gradients():
    """Input gradients through 4 steps of the tiny net in float64: checkpointed == plain autograd ==
    central differences. sigma_max = 0.1 and inputs in [0.3, 0.7] keep every output pixel off the clamp
    (asserted), where the derivative would be cut."""
    net = tiny_net(torch.float64)
    g = torch.Generator().manual_seed(5)
    x = 0.3 + 0.4 * torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    draws = fixed_noise(list(torch.randn(5, 2, 3, 8, 8, generator=g, dtype=torch.float64)))
    w = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    settings = dict(sigma_max=0.1, num_steps=4, S_churn=2.0, S_min=0.0, S_max=1.0)

    def loss(x, grad_checkpoint=False, trace=None):
        return (w * edm_purify(net, x, draws, grad_checkpoint=grad_checkpoint, trace=trace, **settings)).sum()

    trace = []
    loss(x, trace=trace)
    pre_clamp = (trace[-1] + 1) / 2
    assert 0.05 < pre_clamp.min() and pre_clamp.max() < 0.95
    grads = []
    for ckpt in (False, True):
        xg = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(loss(xg, ckpt), xg)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    h = 1e-6
    with torch.no_grad():
        for _ in range(2):
            v = torch.randn(x.shape, generator=g, dtype=torch.float64)
            fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
            assert abs(fd - (grads[1] * v).sum()) <= 1e-5 * max(1.0, abs(fd))


def test_purify_batch_invariance():
    net = tiny_net()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 3, 8, 8, generator=g)
    draws = list(torch.randn(7, 3, 3, 8, 8, generator=g))
    settings = dict(sigma_max=0.5, num_steps=6, S_churn=6.0)
    with torch.no_grad():
        together = edm_purify(net, x, fixed_noise(draws), **settings)
        for b in range(3):
            alone = edm_purify(net, x[b:b + 1], fixed_noise([d[b:b + 1] for d in draws]), **settings)
            torch.testing.assert_close(alone, together[b:b + 1], rtol=0, atol=1e-5)
