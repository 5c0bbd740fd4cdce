"""score_sde's NCSN++ (models/ncsnpp.py) and DiffPure's VP-SDE purification (addt_diffusion.vpsde_purify)
against outputs of the official code.

Fixtures (DATA written by score_sde and DiffPure; see ../shared/fixtures/README.md section 1):
  tests/fixtures/vpsde/full_config_state_dict_shapes.json   copied from ../shared/fixtures/vpsde_ddpmpp/
  ../shared/fixtures/vpsde_ddpmpp/{checkpoint_8.pth, model_outputs.pt, purification_t100.pt,
  small_config_state_dict_shapes.json} are read in place (the checkpoint and the purification are > 2 MB,
  and the outputs need the checkpoint anyway).
"""
import json
import os
import pickle

import pytest
import torch

from addt_common import UserError
from addt_diffusion import (T, fixed_noise, linear_alpha_bar, vpsde_beta_std, vpsde_coefficients, vpsde_purifier,
                            vpsde_purify, vpsde_times)
from models import safe_pickle
from models.ncsnpp import NCSNpp, infer_config, load_score_sde

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "vpsde")
SHARED = os.path.join(HERE, "..", "..", "shared", "fixtures", "vpsde_ddpmpp")
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), image_size=16)  # 16x16 inputs


def shared(name):
    path = os.path.join(SHARED, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: the shared fixtures must lie beside the repository (../shared)")
    return path


@pytest.fixture(scope="module")
def small_model():
    return load_score_sde(shared("checkpoint_8.pth"))


def tiny_model(dtype=torch.float32):
    """A random TINY NCSN++ whose zero-initialised layers (Conv_1, NIN_3, the output conv) matter too."""
    torch.manual_seed(0)
    model = NCSNpp(TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.02 * torch.randn(p.shape, generator=g)
    return model.to(dtype)


def draws(n, shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


# ---------------------------------------------------------------- the network

@pytest.mark.parametrize("name", ["full", "small"])
def test_state_dict_layout_matches_score_sde(name):
    """Keys (in order), shapes, dtypes (float64 sigmas), parameter count and EMA order of score_sde's
    create_model, without the DataParallel `module.` prefix; built on the meta device."""
    path = (os.path.join(FIX, "full_config_state_dict_shapes.json") if name == "full"
            else shared("small_config_state_dict_shapes.json"))
    with open(path) as f:
        ref = json.load(f)
    data = {k: ref["config_data"][k] for k in ("image_size", "num_channels", "centered")}
    with torch.device("meta"):
        model = NCSNpp({**ref["config_model"], **data})  # score_sde's own config dict is accepted
        default = NCSNpp() if name == "full" else None
    expected = [(e["key"].removeprefix("module."), tuple(e["shape"]), e["dtype"]) for e in ref["state_dict"]]
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    ema_order = [k.removeprefix("module.") for k in ref["ema_shadow_params_order"]]
    assert [k for k, _ in model.named_parameters()] == ema_order
    assert all(isinstance(m.Dropout_0, torch.nn.Dropout) for m in model.all_modules if hasattr(m, "Dropout_0"))
    if default is not None:  # the defaults are the real config: 106,632,579 parameters
        assert sum(p.numel() for p in default.parameters()) == 106_632_579
    x = torch.empty(2, 3, 32, 32, device="meta")
    assert model(x, torch.empty(2, device="meta")).shape == x.shape  # every block fits its neighbours
    sd = {k: torch.empty(s, device="meta") for k, s, _ in expected}
    inferred = infer_config(sd)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in ref["config_model"].items() if k in inferred} \
        == {k: v for k, v in inferred.items() if k != "num_channels"}


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="resblock_type"):
        NCSNpp(dict(resblock_type="ddpm"))
    with pytest.raises(ValueError, match="unknown NCSN\\+\\+ config field"):
        NCSNpp(dict(n_f=16))


def test_checkpoint_restores_ema_by_order(small_model):
    """DiffPure runs on ema['shadow_params'] copied in parameters() order, not on 'model'."""
    ckpt = safe_pickle.load(shared("checkpoint_8.pth"), strict=True)
    params = list(small_model.parameters())
    assert len(params) == len(ckpt["ema"]["shadow_params"]) == 212
    assert all(torch.equal(p, s) for p, s in zip(params, ckpt["ema"]["shadow_params"]))
    model_weights = [v for k, v in ckpt["model"].items() if k != "module.sigmas"]
    assert max((p - w).abs().max().item() for p, w in zip(params, model_weights)) > 0.09  # 0.0956: they differ
    torch.testing.assert_close(small_model.sigmas, ckpt["model"]["module.sigmas"], rtol=1e-12, atol=0)
    assert small_model.sigmas.dtype == torch.float64 and not small_model.training
    assert small_model.config["nf"] == 16 and small_model.config["ch_mult"] == (1, 2, 2)
    explicit = load_score_sde(shared("checkpoint_8.pth"), config=dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1))
    assert all(torch.equal(a, b) for a, b in zip(explicit.parameters(), params))
    with pytest.raises(ValueError, match="does not match|has shape"):
        load_score_sde(shared("checkpoint_8.pth"), config=dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=2))


def test_model_outputs_match_score_sde(small_model):
    """The raw (epsilon) output, the score -raw / std(t) and RevVPSDE's drift f and diffusion g."""
    out = torch.load(shared("model_outputs.pt"), weights_only=True)
    torch.testing.assert_close(out["labels"], out["t"] * 999, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(vpsde_beta_std(out["t"])[1], out["marginal_std"], rtol=1e-6, atol=0)  # exp: 1 ulp
        for i, t in enumerate(out["t"]):
            raw = small_model(out["x"], out["labels"][i])
            assert (raw - out["raw_output"][i]).abs().max() <= 1e-5
            # score = raw / std: std(1e-5) ~ 1e-3 scales the float32 error of raw, so compare relatively
            score = -raw / vpsde_beta_std(t)[1]
            assert (score - out["score"][i]).abs().max() <= 1e-5 * out["score"][i].abs().max()
        raw = small_model(out["x"], out["t_mixed"] * 999)
        assert (raw - out["raw_output_mixed"]).abs().max() <= 1e-5
        score = -raw / vpsde_beta_std(out["t_mixed"])[1][:, None, None, None]
        assert (score - out["score_mixed"]).abs().max() <= 1e-5 * out["score_mixed"].abs().max()
        for i, s in enumerate(out["sde_time_s"]):
            label, std, half_beta, g2, _, _ = vpsde_coefficients(torch.stack([s, s]))[0]
            f = half_beta * out["x"] - g2 * small_model(out["x"], label) / std
            assert (f.view(3, -1) - out["revsde_f"][i]).abs().max() <= 1e-5 * out["revsde_f"][i].abs().max()
            torch.testing.assert_close(g2.sqrt().expand(3), out["revsde_g"][i], rtol=0, atol=1e-7)


# ---------------------------------------------------------------- the sampler

def test_purification_matches_diffpure(small_model):
    """RevGuidedDiffusion.image_editing_sample with t = 100, replayed with the recorded eps and dW."""
    ref = torch.load(shared("purification_t100.pt"), weights_only=True)
    times = vpsde_times(0.1)
    assert torch.equal(times, ref["times"]) and torch.equal(times[1:] - times[:-1], ref["dts"])
    assert torch.equal(linear_alpha_bar(T, 0.1 / T, 20.0 / T)[99], ref["alpha_bar"])
    zs = ref["dW"] / ref["dts"].sqrt()[:, None, None, None, None]  # Brownian increments as standard normals
    asked, trace = [], []
    replay = fixed_noise([ref["eps"], *zs])

    def noise(k, like):
        asked.append(k)
        return replay(k, like)

    purifier = vpsde_purifier(small_model, t_star=0.1)
    with torch.no_grad():
        x01 = purifier(ref["x0_01"], noise=noise, trace=trace)
    assert asked == list(range(101)) and purifier.info["noise_draws"] == 101 and purifier.info["steps"] == 100
    assert (trace[0] - ref["x_t"]).abs().max() <= 1e-5
    traj = torch.stack([trace[i] for i in ref["traj_step_indices"]])
    assert (traj - ref["traj"]).abs().max() <= 1e-5
    assert (trace[-1] - ref["x_purified_model"]).abs().max() <= 1e-5
    assert (x01 - ref["x_purified_01"]).abs().max() <= 1e-5
    assert x01.min() < 0 and x01.max() > 1  # DiffPure does not clamp, and neither do we


def test_vpsde_grid_and_settings():
    times = vpsde_times(0.125)  # DiffPure's L2 setting
    assert times[0] == torch.tensor(0.875) and times[-1] == torch.tensor(1 - 1e-5) and len(times) == 126
    with pytest.raises(UserError):
        vpsde_times(0.1234)
    with pytest.raises(UserError):
        vpsde_times(0.1, dt=0)


def test_gradients_exact_under_checkpointing(checkpointed_grads_exact):
    """Fixed noise (dw-both): the input gradient with grad_checkpoint equals plain autograd, and (float64)
    matches central differences along 2 random directions. t* = 0.01 (10 steps) keeps float64 fast."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float32, torch.float64):
        model, noise = tiny_model(dtype), draws(11, x.shape, 5, dtype)
        xd, wd = x.to(dtype), w.to(dtype)

        def loss(x, grad_checkpoint):
            return (vpsde_purify(model, x, fixed_noise(noise), t_star=0.01, grad_checkpoint=grad_checkpoint) * wd).sum()

        checkpointed_grads_exact(loss, xd, (6, 7))


def test_batch_invariance():
    """A batch of 3 gives what each image gives alone with its slice of the same draws."""
    model = tiny_model()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    noise = draws(51, x.shape, 9)
    with torch.no_grad():
        batch = vpsde_purify(model, x, fixed_noise(noise), t_star=0.05)
        alone = torch.cat([vpsde_purify(model, x[i:i + 1], fixed_noise([z[i:i + 1] for z in noise]), t_star=0.05)
                           for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)


def test_euler_matches_torchsde():
    """Oracle: torchsde.sdeint(method='euler') on DiffPure's reverse SDE, driven by the same BrownianInterval."""
    import torchsde
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))

    class RevVPSDE(torch.nn.Module):  # DiffPure's f and g, in torchsde time s = 1 - tau, on flat states
        noise_type, sde_type = "diagonal", "ito"

        def coefs(self, s, n):
            tau = 1 - s.expand(n)
            beta = 0.1 + tau * (20.0 - 0.1)
            std = torch.sqrt(1.0 - torch.exp(2.0 * (-0.25 * tau ** 2 * (20.0 - 0.1) - 0.5 * tau * 0.1)))
            return tau, beta, std

        def f(self, s, y):
            tau, beta, std = self.coefs(s, y.shape[0])
            score = -model(y.view(x.shape), tau * 999).view(y.shape) / std[:, None]
            return -(-0.5 * beta[:, None] * y - torch.sqrt(beta)[:, None] ** 2 * score)

        def g(self, s, y):
            return torch.sqrt(self.coefs(s, y.shape[0])[1])[:, None].expand(y.shape)

    times = vpsde_times(0.02)
    bm = torchsde.BrownianInterval(t0=times[0], t1=times[-1], size=(2, x[0].numel()), entropy=12)
    alpha_bar = linear_alpha_bar(T, 0.1 / T, 20.0 / T)[19]
    x_t = (2 * x - 1) * alpha_bar.sqrt() + eps * (1 - alpha_bar).sqrt()
    with torch.no_grad():
        ys = torchsde.sdeint(RevVPSDE(), x_t.flatten(1), times[[0, -1]], method="euler", dt=1e-3, bm=bm)
        zs = [bm(s, s_next).view(x.shape) / (s_next - s).sqrt() for s, s_next in zip(times[:-1], times[1:])]
        ours = vpsde_purify(model, x, fixed_noise([eps, *zs]), t_star=0.02)
    torch.testing.assert_close(ours * 2 - 1, ys[-1].view(x.shape), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- loading

class RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loader_runs_no_pickled_code(tmp_path):
    marker = tmp_path / "MARKER"
    RunsCode.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(), "ema": {"shadow_params": []}, "step": 1}, path)
    with pytest.raises(ValueError, match="not a plain-data"):
        load_score_sde(str(path))
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.load(str(path), strict=True)
    assert not marker.exists()


def test_loader_plain_state_dicts_and_errors(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    for prefix in ("", "module."):
        path = tmp_path / f"sd{prefix}.pt"
        torch.save({prefix + k: v for k, v in sd.items()}, path)
        loaded = load_score_sde(str(path), config=TINY)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sd.values()))
    with pytest.raises(FileNotFoundError, match="no score_sde checkpoint"):
        load_score_sde(str(tmp_path / "missing.pth"))
    torch.save({"weights": [1, 2]}, tmp_path / "layout.pt")
    with pytest.raises(ValueError, match="neither a score_sde checkpoint"):
        load_score_sde(str(tmp_path / "layout.pt"))
    bad = dict(sd)
    bad["all_modules.3.Conv_0.weight"] = bad["all_modules.3.Conv_0.weight"].clone()
    bad["all_modules.3.Conv_0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="all_modules.3.Conv_0.weight holds non-finite"):
        load_score_sde(str(tmp_path / "nan.pt"), config=TINY)


def test_loader_refuses_non_finite_ema(tmp_path):
    ckpt = safe_pickle.load(shared("checkpoint_8.pth"), strict=True)
    ckpt["ema"]["shadow_params"][5] = ckpt["ema"]["shadow_params"][5].clone().fill_(float("inf"))
    torch.save(ckpt, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match="all_modules.2.bias holds non-finite"):
        load_score_sde(str(tmp_path / "inf.pth"))
