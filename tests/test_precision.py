"""What the speed settings cost in accuracy, against plain fp32: bf16 autocast (UNet output, purification,
attack gradient), torch.compile and channels_last.

Every bound was chosen from measurements on the CPU (torch 2.13, one thread) with the tiny UNet of
attack.TINY_UNET_CONFIG and a WRN-10-1, random weights, seeds 0-3; each test's comment gives the worst
case measured. bf16 on the CPU is addt_common.autocast with an explicit "bf16" ('auto' keeps the CPU in
fp32). The CUDA variants run the scripts' own path (addt_common.autocast, the fused step kernel); their
bounds were not measured on a GPU (see LAYOUT_TOL)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import attack
from addt_common import autocast, prepare_model, resolve_precision
from addt_attacks import Defense
from addt_diffusion import ddpm_purifier, ddpm_purify, diffuse, linear_alpha_bar, make_schedule
from models import build_classifier
from models.unet import UNet

DEVICES = ["cpu", "cuda"]  # the scripts' CPU path (torch reference) and, when kernels run there, CUDA (fused step)
UNET_BF16_REL_L2 = 3e-2  # per image, t = 0, 20, 100, 500, 999; measured <= 1.51e-2
PURIFY_BF16_MAX_ABS = 1e-2  # [0, 1] image space, NFE 5; measured <= 4.4e-3 (about one 8-bit level)
GRAD_BF16_MIN_COS = 0.97  # per image, EoT 2, NFE 5; measured >= 0.989
# fp32 layout / compile differences. CPU: channels_last measured <= 3.6e-7, compile <= 2.2e-6 (UNet
# output of magnitude ~1.5). CUDA: not measured; cuDNN may pick another algorithm per layout (Winograd,
# FFT) with fp32 errors near 1e-5 relative, hence the looser bound.
LAYOUT_TOL = {"cpu": 1e-5, "cuda": 1e-4}


@pytest.fixture(params=DEVICES)
def device(request, kernel_device):
    """The CUDA variants run where conftest.py puts the kernels on CUDA, else they are skipped."""
    if request.param == "cuda" and kernel_device != "cuda":
        pytest.skip(f"kernels run on {kernel_device}: the CPU variant ran")
    return request.param


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = UNet(attack.TINY_UNET_CONFIG).eval().requires_grad_(False)
    return unet, build_classifier("wrn-10-1", 10).eval().requires_grad_(False)


def on(device, *modules):
    return [prepare_model(copy.deepcopy(m), torch.device(device)) for m in modules]


def bf16(device):
    """bf16 autocast as the scripts enter it."""
    return autocast(torch.device(device), "bf16")


def fp32(device):
    device = torch.device(device)
    return autocast(device, resolve_precision("fp32", device))  # on CUDA this also turns TF32 off


def inputs(device, n=8, nfe=5):
    """Images in [0, 1], a schedule and its fixed forward and step noises, drawn on the CPU."""
    g = torch.Generator().manual_seed(1)
    sched = make_schedule("ddpm", nfe)
    x = torch.rand(n, 3, 32, 32, generator=g)
    eps, zs = torch.randn(x.shape, generator=g), torch.randn((sched.n_noise, *x.shape), generator=g)
    return x.to(device), sched, eps.to(device), zs.to(device)


def noisy_batch(device, n=10):
    """x_t at t = 0, 20, 100, 500, 999 (two images each): the range purification and training see."""
    x, _, eps, _ = inputs(device, n)
    t = torch.tensor([0, 20, 100, 500, 999], device=device).repeat_interleave(n // 5)
    return diffuse(x, eps, linear_alpha_bar().to(device)[t].view(-1, 1, 1, 1)), t


def test_unet_bf16_relative_error(models, device):
    unet, = on(device, models[0])
    x_t, t = noisy_batch(device)
    with torch.no_grad():
        with fp32(device):
            ref = unet(x_t, t)
        with bf16(device):
            out = unet(x_t, t).float()
    rel = ((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max()
    assert 0 < rel < UNET_BF16_REL_L2  # > 0: autocast really ran in bf16


def test_purification_bf16_max_error(models, device):
    unet, = on(device, models[0])
    x, sched, eps, zs = inputs(device)
    with torch.no_grad():
        with fp32(device):
            ref = ddpm_purify(unet, x, sched, (eps, zs))
        with bf16(device):
            out = ddpm_purify(unet, x, sched, (eps, zs)).float()
    err = (out - ref).abs().max()
    assert 0 < err < PURIFY_BF16_MAX_ABS


def test_attack_gradient_bf16_cosine(models, device):
    """Defense.eot_gradient at precision bf16 and fp32: the whole attack path, checkpointing included."""
    unet, clf = on(device, *models)
    x, sched, _, _ = inputs(device, n=4)
    y = torch.tensor([0, 3, 5, 9], device=device)
    g = {p: Defense(ddpm_purifier(unet, sched), clf, chunk=8, precision=p).eot_gradient(x, y, [0, 1, 2, 3], 0, 2)[0]
         for p in ("fp32", "bf16")}
    assert not torch.equal(g["fp32"], g["bf16"])
    cos = F.cosine_similarity(g["fp32"].flatten(1), g["bf16"].flatten(1), dim=1)
    assert cos.min() > GRAD_BF16_MIN_COS, cos


def test_compile_matches_eager(models, device):
    """torch.compile of the UNet forward only (about 40 s to compile on one CPU thread; the gradient
    graph would double that), through prepare_model as the scripts use it."""
    eager, = on(device, models[0])
    compiled = prepare_model(copy.deepcopy(models[0]), torch.device(device), compile=True)
    x_t, t = noisy_batch(device, n=5)
    x, sched, eps, zs = inputs(device, n=5)  # same batch size as x_t: one compiled graph serves both
    with torch.no_grad(), fp32(device):
        assert (compiled(x_t, t) - eager(x_t, t)).abs().max() < LAYOUT_TOL[device]
        out, ref = ddpm_purify(compiled, x, sched, (eps, zs)), ddpm_purify(eager, x, sched, (eps, zs))
    assert (out - ref).abs().max() < LAYOUT_TOL[device]


def test_channels_last_purification(models, device):
    unet, = on(device, models[0])
    unet_cl = prepare_model(copy.deepcopy(models[0]), torch.device(device), channels_last=True)
    x, sched, eps, zs = inputs(device)
    with torch.no_grad(), fp32(device):
        ref = ddpm_purify(unet, x, sched, (eps, zs))
        out = ddpm_purify(unet_cl, x.to(memory_format=torch.channels_last), sched, (eps, zs))
    assert unet_cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref).abs().max() < LAYOUT_TOL[device]
