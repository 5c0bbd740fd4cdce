"""models/unet.py against diffusers' UNet2DModel (the oracle), from a non-zero random init so a zero-initialised
layer cannot hide a mistake: outputs, gradients, checkpoint layouts, config fields and errors."""
import json

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from models.unet import DDPM_CIFAR10_CONFIG, UNet

SMALL = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, norm_eps=1e-6,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
             attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0, sample_size=16)
# more fields away from their defaults, each honoured: no mid attention, padding-0 downsampling, own temb width,
# centred input, odd channel counts, a mid-block scale factor, a separate mid-attention group count
SMALL_B = {**SMALL, "add_attention": False, "downsample_padding": 0, "time_embedding_dim": 48,
           "center_input_sample": True, "in_channels": 2, "out_channels": 5, "attention_head_dim": None,
           "mid_block_scale_factor": 1.7}
SMALL_C = {**SMALL, "attn_norm_num_groups": 4, "mid_block_scale_factor": 0.5, "block_out_channels": [16, 32, 48],
           "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
           "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"], "layers_per_block": 2}


def randomise(model, seed=0):
    """Weights N(0, 1 / fan_in), biases N(0, 0.05), GroupNorm scales 1 + N(0, 0.05): nothing zero
    (so a zero init cannot hide a mistake), and activations stay O(1) through the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + gain)
    return model.eval()


def reference(config, path=None, seed=0):
    """A randomised diffusers UNet2DModel, saved to path when given."""
    ref = randomise(UNet2DModel(**config), seed)
    if path is not None:
        ref.save_pretrained(path)
    return ref


def inputs(config, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    return torch.randn(n, config.get("in_channels", 3), size, size, generator=g).clamp(-1, 1)


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddpm_cifar10"))
    ref = reference(DDPM_CIFAR10_CONFIG, path)
    return ref, UNet.from_pretrained(path)


def test_cifar_parameter_count(cifar):
    ref, ours = cifar
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e6, 1) == 35.7 and n == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("n,t", [(1, 0), (1, 999), (3, [0, 417, 999]), (3, "0-d 250")])
def test_cifar_matches_diffusers(cifar, n, t):
    ref, ours = cifar
    x = inputs(DDPM_CIFAR10_CONFIG, n)
    t = torch.tensor(250) if t == "0-d 250" else torch.tensor(t) if isinstance(t, list) else t
    with torch.no_grad():
        expected, got = ref(x, t).sample, ours(x, t)
    assert got.shape == x.shape and expected.abs().max() > 0.1
    assert max_err(got, expected) < 1e-5


@pytest.mark.parametrize("config", [SMALL, SMALL_B, SMALL_C], ids=["small", "small_b", "small_c"])
def test_small_configs_match_diffusers(tmp_path, config):
    ref = reference(config, tmp_path)
    ours = UNet.from_pretrained(str(tmp_path))
    assert ours.config["block_out_channels"] == config["block_out_channels"]
    x, t = inputs(config, 3), torch.tensor([0, 531, 999])
    with torch.no_grad():
        assert max_err(ours(x, t), ref(x, t).sample) < 1e-5
        assert max_err(ours(x[:1], 7), ref(x[:1], 7).sample) < 1e-5


def test_input_gradient_matches_diffusers(tmp_path):
    ref = reference(SMALL, tmp_path)
    ours = UNet.from_pretrained(str(tmp_path))
    x, t = inputs(SMALL, 2), torch.tensor([3, 900])
    grads = []
    for f in (lambda x: ours(x, t), lambda x: ref(x, t).sample):
        x_ = x.clone().requires_grad_(True)
        (f(x_) ** 2).sum().backward()
        grads.append(x_.grad)
    assert max_err(*grads) < 1e-5 and grads[1].abs().max() > 1e-3


@pytest.mark.parametrize("config", [DDPM_CIFAR10_CONFIG, SMALL], ids=["cifar", "small"])
def test_save_pretrained_round_trip_through_diffusers(tmp_path, config):
    torch.manual_seed(0)
    ours = randomise(UNet(config), seed=3)
    ours.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["_class_name"] == "UNet2DModel"
    ref = UNet2DModel.from_pretrained(str(tmp_path)).eval()
    x, t = inputs(config, 1), torch.tensor([123])
    with torch.no_grad():
        assert max_err(ours(x, t), ref(x, t).sample) < 1e-5


def old_attention_names(sd):
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in sd.items():
        for new, old in new_to_old.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        out[k] = v
    return out


@pytest.mark.parametrize("subfolder,fmt,old_names", [
    (True, "safetensors", False), (False, "bin", False), (False, "safetensors", True), (True, "bin", True)])
def test_checkpoint_layouts(tmp_path, subfolder, fmt, old_names):
    """unet/ subfolder (the google/ddpm-cifar10-32 repo layout), .bin weights, pre-0.14 attention names."""
    ref = reference(SMALL)
    folder = tmp_path / "unet" if subfolder else tmp_path
    folder.mkdir(exist_ok=True)
    json.dump({"_class_name": "UNet2DModel", "_diffusers_version": "0.1.1", **SMALL}, open(folder / "config.json", "w"))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if old_names:
        sd = old_attention_names(sd)
        assert any(".proj_attn." in k for k in sd) and not any(".to_q." in k for k in sd)
    if fmt == "bin":
        torch.save(sd, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    ours = UNet.from_pretrained(str(tmp_path))
    x, t = inputs(SMALL, 2), torch.tensor([10, 600])
    with torch.no_grad():
        assert max_err(ours(x, t), ref(x, t).sample) < 1e-5


def test_dropout_override_and_config(tmp_path):
    reference(SMALL, tmp_path)
    ours = UNet.from_pretrained(str(tmp_path), dropout=0.1)
    assert ours.config["dropout"] == 0.1 and ours.down_blocks[0].resnets[0].dropout.p == 0.1
    assert "_class_name" not in ours.config


@pytest.mark.parametrize("override,names", [
    (dict(layers_per_block=2), ["missing keys", "down_blocks.0.resnets.1.conv1.weight"]),
    (dict(add_attention=False), ["unexpected keys", "mid_block.attentions.0."]),
    (dict(out_channels=1), ["shape mismatches", "conv_out.weight"])])
def test_mismatched_checkpoint_names_keys(tmp_path, override, names):
    reference(SMALL, tmp_path)
    with pytest.raises(ValueError, match="does not match") as e:
        UNet.from_pretrained(str(tmp_path), **override)
    assert all(n in str(e.value) for n in names)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet.from_pretrained(str(tmp_path / "nowhere"))
    json.dump(SMALL, open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        UNet.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("field,value", [
    ("time_embedding_type", "fourier"), ("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
    ("num_class_embeds", 10), ("act_fn", "gelu"), ("mid_block_type", None), ("upsample_type", "resnet"),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]), ("up_block_types", ["SkipUpBlock2D", "UpBlock2D"])])
def test_unsupported_config_field(field, value):
    with pytest.raises(ValueError, match=field):
        UNet({**SMALL, field: value})


def test_unknown_override_rejected(tmp_path):
    reference(SMALL, tmp_path)
    with pytest.raises(ValueError, match="dropuot"):
        UNet.from_pretrained(str(tmp_path), dropuot=0.1)


def test_channels_last():
    ours = randomise(UNet(SMALL))
    x, t = inputs(SMALL, 2), torch.tensor([5, 700])
    with torch.no_grad():
        expected = ours(x, t)
        assert max_err(ours(x.to(memory_format=torch.channels_last), t), expected) < 1e-5
        ours.to(memory_format=torch.channels_last)
        assert max_err(ours(x.to(memory_format=torch.channels_last), t), expected) < 1e-5


def test_float64_matches_diffusers():
    ref = reference(SMALL).double()
    ours = UNet(SMALL).double()
    ours.load_state_dict(ref.state_dict())
    x, t = inputs(SMALL, 2).double(), torch.tensor([0, 999])
    with torch.no_grad():
        got = ours(x, t)
        assert got.dtype == torch.float64 and max_err(got, ref(x, t).sample) < 1e-12


def test_bf16_autocast():
    ours = randomise(UNet(SMALL))
    x, t = inputs(SMALL, 2), torch.tensor([5, 700])
    with torch.no_grad():
        expected = ours(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x, t)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert max_err(got.float(), expected) < 0.05 * expected.abs().max()
