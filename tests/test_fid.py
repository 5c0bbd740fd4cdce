"""fid.py: the FID Inception and the Frechet distance against pytorch-fid's own code, the generation samplers
against diffusers' schedulers, score_sde's and EDM's algorithms, keyed noise, resume, sharding and errors.

The oracle is pytorch-fid 0.3.0 (`pip install --no-deps pytorch-fid==0.3.0`) with the torchvision source it
subclasses. PyPI's torchvision does not import beside a local CPU torch (its C extension registers operators
this torch lacks), so it is installed outside site-packages (`pip install --no-deps --target .oracle/torchvision
torchvision==0.28.0`, the README's setup line) and only its pure-Python modules are imported: the packages
`torchvision` and `torchvision.models` are made from their folders without running their __init__.py (which load
the C extension and every model), then torchvision/models/inception.py, pytorch_fid/inception.py and
pytorch_fid/fid_score.py run as they are. pytorch-fid's download of the weights is replaced by a file of random
weights saved from torchvision's Inception3 that pytorch-fid patches (so its exact key names), which
pytorch-fid loads with its own strict load_state_dict and fid.py loads into models/inception.py.
"""
import importlib
import importlib.util
import math
import os
import re
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

import fid
from addt_common import UserError, run_main, sample_seed
from addt_diffusion import (KeyedNoise, ddpm_generate, edm_generate, generation_schedule, new_diffusion_model,
                            vpsde_generate)
from attack import TINY_EDM_CONFIG, TINY_UNET_CONFIG, TINY_VPSDE_CONFIG
from models.unet import UNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION = os.path.join(REPO, ".oracle", "torchvision", "torchvision")
SETUP = "python -m pip install --no-deps --target .oracle/torchvision torchvision==0.28.0"


# ---------------------------------------------------------------- the oracle: pytorch-fid's own code

@pytest.fixture(scope="module")
def pytorch_fid():
    """pytorch_fid.inception and pytorch_fid.fid_score, imported over torchvision's pure-Python source; every
    module imported here is removed afterwards, so no other test sees the partial torchvision."""
    if not os.path.isfile(os.path.join(TORCHVISION, "models", "inception.py")):
        pytest.fail(f"the oracle needs torchvision's source in {TORCHVISION}: run `{SETUP}` in the repository")
    before = set(sys.modules)
    for name, folder in (("torchvision", TORCHVISION), ("torchvision.models", os.path.join(TORCHVISION, "models"))):
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        sys.modules[name] = importlib.util.module_from_spec(spec)  # the package, its __init__.py not run
    tv, tv_models = sys.modules["torchvision"], sys.modules["torchvision.models"]
    with open(os.path.join(TORCHVISION, "version.py")) as f:  # read, not imported: it imports the C extension
        tv.__version__ = re.search(r"__version__ = '([^']+)'", f.read())[1]
    tv.models = tv_models
    tv_models.inception_v3 = importlib.import_module("torchvision.models.inception").inception_v3  # as models/__init__
    inception = importlib.import_module("pytorch_fid.inception")
    fid_score = importlib.import_module("pytorch_fid.fid_score")
    assert "torchvision.extension" not in sys.modules  # no C extension was loaded
    yield inception, fid_score
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("torchvision", "pytorch_fid"):
            del sys.modules[name]


def random_bn_stats(state, seed):
    """Every tensor of an Inception state dict random, batch-norm statistics included (variance > 0), scaled so
    that activations neither vanish nor blow up through the 94 convolutions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", "bn.bias")):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
    return out


@pytest.fixture(scope="module")
def weights(pytorch_fid, tmp_path_factory):
    """A random-weight stand-in for pt_inception-2015-12-05-6726825d.pth, keyed as the oracle's network."""
    inception, _ = pytorch_fid
    skeleton = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # what fid_inception_v3 fills
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_bn_stats(skeleton.state_dict(), 0), path)
    return str(path)


@pytest.fixture(scope="module")
def networks(pytorch_fid, weights, monkeypatch_module):
    inception, _ = pytorch_fid
    monkeypatch_module.setattr(inception, "load_state_dict_from_url",
                               lambda url, **kw: torch.load(weights, weights_only=True))
    oracle = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours, sha256 = fid.load_inception(weights)
    return oracle, ours, sha256


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_features_equal_pytorch_fids(networks):
    oracle, ours, _ = networks
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = oracle(x)[0].flatten(1)
        f = ours(x)
    assert f.shape == ref.shape == (3, 2048)
    assert (f - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (ref[0] - ref[1]).abs().max() > 1e-3 * ref.abs().max()  # the features see the image


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Matrix is singular")  # scipy, in pytorch-fid
def test_frechet_distance_equals_pytorch_fids(pytorch_fid):
    _, fid_score = pytorch_fid
    rng = np.random.default_rng(0)
    for n, d in ((400, 64), (30, 64), (3, 16)):  # full-rank covariances, then singular ones (n < d)
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
        b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.1
        stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        ref = fid_score.calculate_frechet_distance(*stats)
        assert fid.frechet_distance(*stats) == pytest.approx(ref, rel=1e-7 if n > d else 1e-5)
        if n > d:  # a distribution against itself (singular ones keep sqrt(rounding) ~ 1e-8 per zero eigenvalue)
            mu, sigma = stats[0], stats[1]
            assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


def test_sqrtm_psd_equals_scipy():
    rng = np.random.default_rng(1)
    for rank in (40, 7):  # positive definite, then semi-definite
        a = rng.normal(size=(40, rank))
        spd = a @ a.T + (1e-3 * np.eye(40) if rank == 40 else 0)
        root = fid.sqrtm_psd(spd)
        assert np.abs(root @ root - spd).max() < 1e-10 * np.abs(spd).max()
        if rank == 40:  # scipy's Schur method is accurate only where the matrix is well conditioned
            np.testing.assert_allclose(root, scipy.linalg.sqrtm(spd).real, rtol=0, atol=1e-10)


def test_feature_stats_equal_numpy():
    f = torch.randn(37, 2048, dtype=torch.float64) * 0.2 + 0.5
    stats = fid.FeatureStats(2048, "cpu")
    for lo in range(0, 37, 10):  # in batches, as the script adds them
        stats.add(f[lo:lo + 10].float())
    mu, sigma = stats.mu_sigma()
    f32 = f.float().double().numpy()
    np.testing.assert_allclose(mu, f32.mean(0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=0, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64


# ---------------------------------------------------------------- the samplers

def perturbed(model, seed=1):
    """Random weights where the zero-initialised layers matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.02 * torch.randn(p.shape, generator=g)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"ddpm": perturbed(UNet({**TINY_UNET_CONFIG, "sample_size": 16})),
            "vpsde": perturbed(new_diffusion_model("vpsde", {**TINY_VPSDE_CONFIG, "image_size": 16})),
            "edm": perturbed(new_diffusion_model("edm", {**TINY_EDM_CONFIG, "img_resolution": 16}))}


SCHED_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ddpm_generation_equals_diffusers_pipeline(models, monkeypatch, sampler):
    """DDPMPipeline / DDIMPipeline's loop: x_T = noise, scheduler.step over set_timesteps(10), (x + 1) / 2."""
    unet, steps = models["ddpm"], 10
    sched = generation_schedule(sampler, steps)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    zs = torch.randn(sched.n_noise, 2, 3, 16, 16, generator=g)
    if sampler == "ddpm":
        scheduler = DDPMScheduler(**SCHED_CONFIG, variance_type="fixed_large")
        draws = iter(zs)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(draws))
    else:
        scheduler = DDIMScheduler(**SCHED_CONFIG, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    assert sched.timesteps == [int(t) for t in scheduler.timesteps]
    image = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            image = scheduler.step(unet(image, torch.full((2,), int(t))), t, image).prev_sample
        ours = ddpm_generate(unet, torch.empty(2, 3, 16, 16), sched, [x_T, *zs])
    # x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies float32 rounding by 63 at t = 900,
    # where DDIM's deterministic steps carry it to the end (DDPM's fresh noise dilutes it)
    assert (ours - (image / 2 + 0.5).clamp(0, 1)).abs().max() < (1e-5 if sampler == "ddpm" else 2e-4)
    assert sched.n_noise == (steps - 1 if sampler == "ddpm" else 0)


def test_generation_schedules_cover_the_whole_process():
    assert generation_schedule("ddpm", 1000).timesteps == list(range(999, -1, -1))  # the default, all 1000 steps
    assert generation_schedule("ddim", 100).timesteps == list(range(990, -1, -10))
    scheduler = DDPMScheduler(**SCHED_CONFIG)
    scheduler.set_timesteps(300)  # T not a multiple of the steps: diffusers' 'leading' spacing still
    assert generation_schedule("ddpm", 300).timesteps == [int(t) for t in scheduler.timesteps]
    with pytest.raises(UserError, match="--steps"):
        generation_schedule("ddpm", 1001)


def test_vpsde_generation_equals_score_sde_euler_maruyama(models):
    """score_sde's pc sampler with its EulerMaruyamaPredictor, no corrector and noise removal, on the continuous
    VP-SDE (beta 0.1..20), written from score_sde's sde_lib / sampling formulas."""
    model, N, eps = models["vpsde"], 6, 1e-3
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(N)]
    x = draws[0]
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(1.0, eps, N)):
            beta_t = 0.1 + t * (20.0 - 0.1)
            log_mean_coeff = -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
            std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))
            score = -model(x, (t * 999).expand(2)) / std
            drift = -0.5 * beta_t * x - beta_t * score  # the reverse SDE's drift
            dt = -1.0 / N
            x_mean = x + drift * dt
            x = x_mean + torch.sqrt(beta_t) * math.sqrt(-dt) * (draws[i + 1] if i + 1 < N else 0)
        ours = vpsde_generate(model, torch.empty(2, 3, 16, 16), draws, steps=N, eps=eps)
    assert (ours - (x_mean + 1) / 2).abs().max() < 1e-4


def test_edm_generation_equals_edm_sampler(models):
    """NVlabs/edm generate.py's edm_sampler with its defaults (S_churn 0: Heun's method, the 2nd-order correction
    skipped at the last step), in float64 as there."""
    net, N, rho = models["edm"], 5, 7.0
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    i = torch.arange(N, dtype=torch.float64)
    t_steps = (80 ** (1 / rho) + i / (N - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    x_next = latents.double() * t_steps[0]
    with torch.no_grad():
        for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next
            d_cur = (x_cur - net(x_cur.float(), t_cur.float()).double()) / t_cur
            x_next = x_cur + (t_next - t_cur) * d_cur
            if k < N - 1:
                d_prime = (x_next - net(x_next.float(), t_next.float()).double()) / t_next
                x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        ours = edm_generate(net, torch.empty(2, 3, 16, 16), [latents] + [torch.zeros_like(latents)] * N, num_steps=N)
    ref = ((x_next.float() + 1) / 2).clamp(0, 1)
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - ref).abs().max() < 1e-2 * ref.std()  # not a trivially small output


@pytest.mark.parametrize("family", ["ddpm", "vpsde", "edm"])
def test_keyed_generation_is_deterministic_and_batch_independent(models, family):
    """Image i depends on (seed, i) only: the same images in one batch of 4, in two of 2, and again."""
    run = {"ddpm": lambda like, noise: ddpm_generate(models["ddpm"], like, generation_schedule("ddpm", 4), noise),
           "vpsde": lambda like, noise: vpsde_generate(models["vpsde"], like, noise, steps=4),
           "edm": lambda like, noise: edm_generate(models["edm"], like, noise, num_steps=3)}[family]

    def images(idx):
        keys = torch.tensor([sample_seed(0, i) for i in idx])
        with torch.no_grad():
            return run(torch.empty(len(idx), 3, 16, 16), KeyedNoise(keys))

    whole = images(range(4))
    assert torch.equal(whole, images(range(4)))
    assert (torch.cat([images(range(2)), images(range(2, 4))]) - whole).abs().max() < 1e-5
    assert (whole[0] - whole[1]).abs().max() > 1e-2  # the keys differ per image


# ---------------------------------------------------------------- the script

def argv(inputs, weights, out, *extra):
    return ["--ddpm", inputs["ddpm"], "--steps", "3", "--num-images", "3", "--chunk", "1", "--batch-size", "1",
            "--inception", weights, "--data", inputs["data"], "--ref-n", "2", "--out", str(out), *extra]


def expected_images(inputs, n):
    """Image i sampled on its own with its keyed noise (as the run samples it: one image per call)."""
    unet, sched = UNet.from_pretrained(inputs["ddpm"]).eval(), generation_schedule("ddpm", 3)
    with torch.no_grad():
        return [fid.to_uint8(ddpm_generate(unet, torch.empty(1, 3, 32, 32), sched,
                                           KeyedNoise(torch.tensor([sample_seed(0, i)]))))[0] for i in range(n)]


def test_resume_after_interruption_equals_uninterrupted_run(smoke_inputs, weights, tmp_path, killed_at):
    """Killed inside the second image, resumed: every image equals its uninterrupted sample, and the end-to-end
    run writes fid.json, the statistics and the sample grid."""
    out = tmp_path / "run"
    restore = killed_at(fid, "to_uint8", 2)  # image 0 written, the run killed before image 1 is
    with pytest.raises(KeyboardInterrupt):
        fid.main(argv(smoke_inputs, weights, out))
    restore()
    assert sorted(os.listdir(out / "samples")) == ["00000.npz"]
    (out / "samples" / "00001.npz.12345.tmp").write_bytes(b"cut")  # a write a kill interrupted
    with pytest.raises(UserError, match="--resume"):
        fid.main(argv(smoke_inputs, weights, out))
    res = fid.main(argv(smoke_inputs, weights, out, "--resume"))
    assert sorted(os.listdir(out / "samples")) == ["00000.npz", "00001.npz", "00002.npz"]
    for i, image in enumerate(expected_images(smoke_inputs, 3)):
        with np.load(out / "samples" / f"{i:05d}.npz") as z:
            assert np.array_equal(z["images"][0], image), f"image {i}"

    assert fid.read_json(str(out / "fid.json"), "fid")["fid"] == res["fid"] and math.isfinite(res["fid"])
    assert res["n"] == 3 and res["sampler"]["model_calls"] == 3 and res["sampler"]["first_timestep"] == 666
    assert res["reference"] == {**res["reference"], "n": 2, "ref_n": "2", "split": "train", "computed": True}
    assert res["inception"]["published_weights"] is False and (out / "samples.png").is_file()
    mu, sigma, meta = fid.read_ref_stats(str(out / "ref_stats.npz"), {})
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and meta["n"] == 2
    assert fid.read_ref_stats(str(out / "sample_stats.npz"), {})[2]["n"] == 3


def test_torchrun_shards_the_images(smoke_inputs, weights, tmp_path, torchrun):
    """Two processes: the same images as one process samples, and the statistics of all of them."""
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # given: not computed again
    out = tmp_path / "two"
    proc = torchrun("fid.py", *argv(smoke_inputs, weights, out, "--ref-stats", tmp_path / "ref.npz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = expected_images(smoke_inputs, 3)
    for i, image in enumerate(images):
        with np.load(out / "samples" / f"{i:05d}.npz") as z:
            assert np.array_equal(z["images"][0], image), f"image {i}"
    stats = fid.FeatureStats(2048, "cpu")
    inception, _ = fid.load_inception(weights)
    with torch.no_grad():
        fid.add_features(stats, inception, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), range(3), 3)
    mu, sigma = stats.mu_sigma()
    with np.load(out / "sample_stats.npz") as z:
        # float32 features differ by rounding (1e-7 relative) in another process and batch; the covariance by
        # that times the spread of the features
        scale, spread = np.abs(mu).max(), np.sqrt(np.diag(sigma).max())
        np.testing.assert_allclose(z["mu"], mu, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(z["sigma"], sigma, rtol=0, atol=1e-5 * scale * spread)
        assert spread ** 2 > 100 * 1e-5 * scale * spread  # so an image missing or counted twice would show
    res = fid.read_json(str(out / "fid.json"), "fid")
    assert res["timing"]["world"] == 2 and res["reference"]["computed"] is False and math.isfinite(res["fid"])


# ---------------------------------------------------------------- errors: one line, before the long part

def test_missing_weight_file_is_one_error_line(smoke_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: fid.main(["--ddpm", smoke_inputs["ddpm"], "--inception", str(tmp_path / "none.pth"),
                                   "--out", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: Inception weights not found")
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in err
    assert not (tmp_path / "out").exists()  # refused before anything was made


@pytest.mark.parametrize("flags,message", [
    (["--model", "vpsde", "--sampler", "ddim"], "--sampler applies"),
    (["--eta", "0.5"], "--eta applies"),
    (["--sampling-eps", "0.01"], "--sampling-eps applies"),
    (["--steps", "0"], "--steps must be positive"),
    (["--sampler", "ddim", "--steps", "1001"], r"--steps must lie in \[1, 1000\]"),
    (["--model", "edm", "--edm", "x.pkl", "--steps", "1"], "at least 2"),
    (["--n", "1"], "at least 2"),
    (["--model", "edm"], "pass --edm PATH"),
])
def test_bad_flags_are_refused(smoke_inputs, weights, tmp_path, flags, message):
    base = ["--ddpm", smoke_inputs["ddpm"], "--inception", weights, "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match=message):
        fid.parse_args(base + flags)


def test_bad_weight_and_statistics_files(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as torch < 0.4.1 saved them
    torch.save(old, tmp_path / "old.pth")
    assert fid.load_inception(str(tmp_path / "old.pth"))[0].Mixed_7c.branch_pool.bn.num_batches_tracked == 0
    del state["fc.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="1 keys missing"):
        fid.load_inception(str(tmp_path / "missing.pth"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(UserError, match="non-finite"):
        fid.load_inception(str(tmp_path / "nan.pth"))
    path = str(tmp_path / "stats.npz")
    fid.write_npz(path, mu=np.zeros(2048), sigma=np.eye(2048), data=np.array("cifar10"),
                  inception_sha256=np.array("ab"))
    with pytest.raises(UserError, match="inception_sha256 'ab'"):
        fid.read_ref_stats(path, {"data": "cifar10", "inception_sha256": "cd"})
    fid.write_npz(path, mu=np.zeros(2048), sigma=np.eye(2048), ref_n=np.array("4"))
    with pytest.raises(UserError, match="ref_n '4' .this run: 'all'"):  # a smoke run's statistics, not the set's
        fid.read_ref_stats(path, {"ref_n": "all"})
    np.savez(tmp_path / "pytorch_fid_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # pytorch-fid's own layout
    assert fid.read_ref_stats(str(tmp_path / "pytorch_fid_stats.npz"), {"data": "cifar10"})[2] == {}
    with pytest.raises(UserError, match="non-finite|NaN"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.full(3, np.nan), np.eye(3))
