"""The DDPM CIFAR-10 UNet (Ho et al. 2020) in plain torch, with diffusers' UNet2DModel parameter names,
so google/ddpm-cifar10-32 loads with strict name checking and gives the same output as diffusers.

    from models.unet import UNet, DDPM_CIFAR10_CONFIG
    unet = UNet.from_pretrained("weights/ddpm-cifar10-32")         # config.json + weights, top level or unet/
    unet = UNet.from_pretrained("weights/ddpm-cifar10-32", dropout=0.1)   # config override, e.g. for training
    eps_hat = unet(x_t, t)               # x_t in [-1, 1], (N, C, H, W); t int tensor (N,), 0-d tensor or int
    unet.save_pretrained("runs/addt/unet")   # diffusers.UNet2DModel.from_pretrained reads it back
    unet = UNet(DDPM_CIFAR10_CONFIG)     # random init

Needs only torch and safetensors: copy the file into another project as it is.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

DDPM_CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    freq_shift=1, flip_sin_to_cos=False, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], mid_block_scale_factor=1,
    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
    resnet_time_scale_shift="default")

# UNet2DModel's defaults (diffusers 0.42); config.json keys outside this dict are ignored, as diffusers does.
DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    mid_block_type="UNetMidBlock2D", up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[224, 448, 672, 896], layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)
# field -> the only values this file implements
SUPPORTED = dict(time_embedding_type=["positional"], mid_block_type=["UNetMidBlock2D"], downsample_type=["conv"],
                 upsample_type=["conv"], act_fn=["silu", "swish"], resnet_time_scale_shift=["default"],
                 class_embed_type=[None], num_class_embeds=[None])
BLOCK_TYPES = dict(down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"])
OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def rename_old_attention(key):
    """down_blocks.1.attentions.0.query.weight -> down_blocks.1.attentions.0.to_q.weight; other keys unchanged."""
    parts = key.split(".")
    if len(parts) > 2 and "attentions" in parts[:-2] and parts[-2] in OLD_ATTN_NAMES:
        parts[-2] = OLD_ATTN_NAMES[parts[-2]]
    return ".".join(parts)


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift):
    """Sinusoidal embedding of t in float32, as diffusers' get_timestep_embedding (max period 10000)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    arg = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)] if flip_sin_to_cos else [torch.sin(arg), torch.cos(arg)], -1)
    return F.pad(emb, (0, dim % 2))


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, temb_ch, groups, eps, dropout, scale=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.scale = scale

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.scale


class Attention(nn.Module):
    """Self-attention over the H*W positions with a residual connection (diffusers' deprecated AttentionBlock)."""

    def __init__(self, ch, head_dim, groups, eps, scale=1.0):
        super().__init__()
        self.heads, self.head_dim, self.scale = ch // head_dim, head_dim, scale
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, ch, eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, inner), nn.Linear(ch, inner), nn.Linear(ch, inner)
        # diffusers' to_out = [Linear, Dropout(0)]: training sets every Dropout of the UNet, this one included
        self.to_out = nn.ModuleList([nn.Linear(inner, ch), nn.Dropout(0.0)])

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.group_norm(x.flatten(2)).transpose(1, 2)  # (N, HW, C); norm on (N, C, HW) as diffusers does
        q, k, v = (f(s).view(n, h * w, self.heads, self.head_dim).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))
        # fused SDPA accumulates the softmax in fp32 for bf16/fp16 inputs; fp64 takes the exact math path
        o = F.scaled_dot_product_attention(q, k, v).to(q.dtype).transpose(1, 2).reshape(n, h * w, -1)
        o = self.to_out[1](self.to_out[0](o)).transpose(1, 2).reshape(n, c, h, w)  # a channels_last view
        return (o + x) / self.scale  # o first, as diffusers: the sum (and what follows) stays channels_last


class Downsample(nn.Module):
    def __init__(self, ch, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        # padding 0 pads one pixel right and bottom only (TensorFlow "SAME" of the original DDPM release)
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """DownBlock2D, or AttnDownBlock2D with attn=True: layers x (resnet [+ attention]), then a strided conv."""

    def __init__(self, cin, cout, n_layers, attn, downsample, c, temb_ch):
        super().__init__()
        g, eps = c["norm_num_groups"], c["norm_eps"]
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, temb_ch, g, eps, c["dropout"])
                                      for i in range(n_layers)])
        self.attentions = nn.ModuleList([Attention(cout, c["attention_head_dim"] or cout, g, eps)
                                         for _ in range(n_layers if attn else 0)])
        self.downsamplers = nn.ModuleList([Downsample(cout, c["downsample_padding"])]) if downsample else None

    def forward(self, h, temb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            h = self.attentions[i](h) if len(self.attentions) else h
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: each resnet takes the running features concatenated with one skip."""

    def __init__(self, cin, cprev, cout, n_layers, attn, upsample, c, temb_ch):
        super().__init__()
        g, eps = c["norm_num_groups"], c["norm_eps"]
        self.resnets = nn.ModuleList([
            ResnetBlock((cprev if i == 0 else cout) + (cin if i == n_layers - 1 else cout), cout, temb_ch, g, eps,
                        c["dropout"]) for i in range(n_layers)])
        self.attentions = nn.ModuleList([Attention(cout, c["attention_head_dim"] or cout, g, eps)
                                         for _ in range(n_layers if attn else 0)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, h, skips, temb):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            h = self.attentions[i](h) if len(self.attentions) else h
        return self.upsamplers[0](h) if self.upsamplers is not None else h


class MidBlock(nn.Module):
    """UNetMidBlock2D with one layer: resnet, attention (if add_attention), resnet."""

    def __init__(self, ch, c, temb_ch):
        super().__init__()
        g, eps, s = c["norm_num_groups"], c["norm_eps"], c["mid_block_scale_factor"]
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_ch, g, eps, c["dropout"], s) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(ch, c["attention_head_dim"] or ch, c["attn_norm_num_groups"] or g,
                                                   eps, s)] if c["add_attention"] else [])

    def forward(self, h, temb):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h) if len(self.attentions) else h
        return self.resnets[1](h, temb)


INT_FIELDS = ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", "freq_shift", "downsample_padding")


def check_config(config):
    """The config with diffusers' defaults filled in; ValueError naming the field for anything this UNet
    does not implement or a value of the wrong type."""
    if not isinstance(config, dict):
        raise ValueError(f"UNet config must be a JSON object, not {type(config).__name__}")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    for field in INT_FIELDS:
        if not isinstance(c[field], int) or isinstance(c[field], bool) or c[field] < 0:
            raise ValueError(f"UNet config: {field} must be a non-negative integer, not {c[field]!r}")
    if c["layers_per_block"] < 1 or c["norm_num_groups"] < 1:
        raise ValueError("UNet config: layers_per_block and norm_num_groups must be at least 1")
    for field in ("block_out_channels", "down_block_types", "up_block_types"):
        if not isinstance(c[field], (list, tuple)) or not c[field]:
            raise ValueError(f"UNet config: {field} must be a non-empty list, not {c[field]!r}")
    if any(not isinstance(ch, int) or isinstance(ch, bool) or ch < 1 or ch % c["norm_num_groups"]
           for ch in c["block_out_channels"]):
        raise ValueError(f"UNet config: block_out_channels {c['block_out_channels']} must be positive integers "
                         f"divisible by norm_num_groups {c['norm_num_groups']}")
    for field in ("flip_sin_to_cos", "center_input_sample", "add_attention"):
        if not isinstance(c[field], bool):
            raise ValueError(f"UNet config: {field} must be true or false, not {c[field]!r}")
    for field in ("norm_eps", "dropout", "mid_block_scale_factor"):
        if not isinstance(c[field], (int, float)) or isinstance(c[field], bool):
            raise ValueError(f"UNet config: {field} must be a number, not {c[field]!r}")
    for field, ok in SUPPORTED.items():
        if c[field] not in ok:
            raise ValueError(f"unsupported UNet config: {field}={c[field]!r} (this UNet implements {ok})")
    for field, ok in BLOCK_TYPES.items():
        if any(b not in ok for b in c[field]):
            raise ValueError(f"unsupported UNet config: {field}={c[field]!r} (each must be one of {ok})")
    if not len(c["block_out_channels"]) == len(c["down_block_types"]) == len(c["up_block_types"]):
        raise ValueError("UNet config: block_out_channels, down_block_types and up_block_types differ in length")
    return c


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = check_config(config)
        ch, n = list(c["block_out_channels"]), len(c["block_out_channels"])
        temb_ch = c["time_embedding_dim"] or 4 * ch[0]
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = nn.ModuleDict(dict(linear_1=nn.Linear(ch[0], temb_ch),
                                                 linear_2=nn.Linear(temb_ch, temb_ch)))
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], c["layers_per_block"], kind == "AttnDownBlock2D", i < n - 1, c, temb_ch)
            for i, kind in enumerate(c["down_block_types"])])
        self.mid_block = MidBlock(ch[-1], c, temb_ch)
        rch = ch[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], c["layers_per_block"] + 1,
                    kind == "AttnUpBlock2D", i < n - 1, c, temb_ch)
            for i, kind in enumerate(c["up_block_types"])])
        self.conv_norm_out = nn.GroupNorm(c["norm_num_groups"], ch[0], c["norm_eps"])
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], 3, padding=1)

    def forward(self, x, t):
        """Predicted noise eps_hat(x_t, t), same shape as x."""
        c = self.config
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = timestep_embedding(t, self.conv_in.out_channels, c["flip_sin_to_cos"], c["freq_shift"])
        temb = temb.to(self.conv_in.weight.dtype)  # the MLP runs in the weights' dtype, as in diffusers
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))
        h = self.conv_in(2 * x - 1.0 if c["center_input_sample"] else x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb)
            skips += s
        h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    @classmethod
    def from_pretrained(cls, path, **config_overrides):
        """Load a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or .bin),
        at path or path/unet/, checking every parameter name and shape."""
        for folder in (path, os.path.join(path, "unet")):
            weights = [os.path.join(folder, "diffusion_pytorch_model" + ext) for ext in (".safetensors", ".bin")]
            weights = [w for w in weights if os.path.isfile(w)]
            if os.path.isfile(os.path.join(folder, "config.json")) and weights:
                break
        else:
            where = "" if os.path.isdir(path) else " (no such directory)"
            raise FileNotFoundError(f"no UNet at {path}{where}: expected config.json and diffusion_pytorch_model"
                                    f".safetensors (or .bin) in {path} or in {os.path.join(path, 'unet')}")
        unknown = [k for k in config_overrides if k not in DEFAULTS]
        if unknown:
            raise ValueError(f"unknown UNet config override(s) {unknown}")
        config_path = os.path.join(folder, "config.json")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e})") from None
        model = cls({**config, **config_overrides})
        w = weights[0]  # safetensors when both are there
        try:
            sd = load_file(w) if w.endswith(".safetensors") else torch.load(w, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, empty or foreign files raise many different types
            raise ValueError(f"could not read the weights {w} (truncated or not a weights file?): "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{w} holds a {type(sd).__name__}, not a state dict")
        bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{w} holds non-finite weights (NaN or inf in {bad[0]}): a diverged run")
        model.load_checked(sd, w)
        return model

    def load_checked(self, sd, source="state dict"):
        """load_state_dict(strict=True) with old attention names mapped and a readable error on mismatch."""
        sd = {rename_old_attention(k): v for k, v in sd.items()}
        own = self.state_dict()
        missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
        shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}"
                  for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        problems = [f"{len(v)} {what} {v[:5]}" for what, v in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", shapes)) if v]
        if problems:
            raise ValueError(f"checkpoint {source} does not match the UNet config: " + "; ".join(problems))
        self.load_state_dict(sd, strict=True)

    def save_pretrained(self, path):
        """Write config.json and diffusion_pytorch_model.safetensors, the layout diffusers reads."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json.tmp"), "w") as f:
            json.dump({"_class_name": "UNet2DModel", **self.config}, f, indent=2)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with open(os.path.join(path, "diffusion_pytorch_model.safetensors.tmp"), "wb") as f:
            f.write(save(sd))  # a Python write: a full disk raises OSError (ENOSPC)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # rename last: never half-written
            os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
