"""EDM's denoiser (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): the DDPM++ `SongUNet` inside the `EDMPrecond` (or `VPPrecond`) preconditioner, with NVlabs/edm's
parameter names, so its pickled snapshots and ADDT's exported state dicts load with strict name checking.

    net = load_edm("edm-cifar10-32x32-uncond-vp.pkl")   # EDM pickle: config read from the file, no code run
    net = load_edm("edm_cifar_uncond.pth")              # ADDT's export: a state dict, config read off the shapes
    D = net(x, sigma)          # x (N, C, H, W) in [-1, 1] plus noise of std sigma; sigma a float, 0-d or (N,)
    net = EDMPrecond(32, 3, **DDPMPP_CIFAR10)           # random init (EDM's initialisation)

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)) (EDM Table 1). Implemented:
SongUNet with embedding_type 'positional', encoder and decoder 'standard' (the DDPM++ layout of every
EDM/ADDT CIFAR-10 model); anything else is refused by name. The network runs in the input's dtype
(fp32, fp64 for gradient checks, bf16 under autocast); EDM's `use_fp16` flag is read and ignored.

Needs only torch (and models/safe_pickle.py for EDM's pickles): copy both files into another project.
"""
import math
import os
import re
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import safe_pickle

# train.py --arch=ddpmpp (the EDM and ADDT CIFAR-10 networks), with the SongUNet defaults spelled out
DDPMPP_CIFAR10 = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                      decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                      channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16],
                      augment_dim=9, dropout=0.13)


def _xavier_uniform(shape, fan_in, fan_out, gain=1.0):
    return gain * math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_weight=1.0):
        super().__init__()
        self.weight = nn.Parameter(_xavier_uniform([out_features, in_features], in_features, out_features, init_weight))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """'same' convolution, optionally after 2x up- or downsampling with the separable `resample_filter`
    (a persistent buffer, as in EDM's state dicts)."""

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False, resample_filter=(1, 1),
                 init_weight=1.0):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = nn.Parameter(_xavier_uniform([out_channels, in_channels, kernel, kernel], fan_in, fan_out,
                                                   init_weight))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (f.outer(f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x):
        f = self.resample_filter
        if f is not None:
            f_pad = (f.shape[-1] - 1) // 2
            taps = f.to(x.dtype).tile([self.in_channels, 1, 1, 1])
            if self.up:  # transposed depthwise filter: nearest-neighbour upsampling for [1, 1]
                x = F.conv_transpose2d(x, taps * 4, groups=self.in_channels, stride=2, padding=f_pad)
            else:        # depthwise filter with stride 2: 2x2 average pooling for [1, 1]
                x = F.conv2d(x, taps, groups=self.in_channels, stride=2, padding=f_pad)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


def group_norm(channels, eps=1e-6):
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)  # EDM: at least 4 channels per group


class UNetBlock(nn.Module):
    """SongUNet's residual block (DDPM++ settings: additive embedding, one attention head, skip scale
    sqrt(1/2), a 1x1 projection on the skip path whenever the shape changes)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 dropout=0.0, resample_filter=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.attention = in_channels, out_channels, attention
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
        x = self.conv1(self.dropout(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.attention:
            n, c, h, w = x.shape
            # EDM's qkv channels are interleaved: channel 3i + j is (q, k, v)[j] of channel i
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, h * w).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(n, c, h, w)) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """EDM's re-implementation of DDPM++ (Song et al. 2021): mapping network, encoder, decoder; module
    names such as `enc.16x16_block0` and `dec.32x32_aux_conv` are EDM's."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        super().__init__()
        for name, value, supported in [("label_dim", label_dim, 0), ("embedding_type", embedding_type, "positional"),
                                       ("encoder_type", encoder_type, "standard"),
                                       ("decoder_type", decoder_type, "standard")]:
            if value != supported:
                raise ValueError(f"SongUNet {name}={value!r} is not implemented here (only {supported!r}: the "
                                 "unconditional DDPM++ network)")
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        # Mapping: noise level (and augmentation labels) -> embedding
        self.noise_channels = noise_channels
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder: every module's output is a skip connection
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cout, model_channels * mult,
                                                                attention=res in attn_resolutions, **block)
                cout = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: each `_block` takes one skip, in reverse order
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cout + skips.pop(), model_channels * mult,
                                                                attention=attn, **block)
                cout = model_channels * mult
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = group_norm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3, init_weight=1e-5)

    def embed_noise(self, c_noise):
        """Positional embedding of c_noise (N,) with endpoint frequencies 1 ... 1/10000, as [sin, cos]."""
        half = self.noise_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1))
        arg = c_noise[:, None] * freqs.to(c_noise.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=1)

    def forward(self, x, c_noise, augment_labels=None):
        emb = self.embed_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                x = block(torch.cat([x, skips.pop()], dim=1) if "_block" in name else x, emb)
        return out


def _precond_args(model_type, use_fp16):
    if model_type != "SongUNet":
        raise ValueError(f"model_type={model_type!r} is not implemented here (only 'SongUNet', the DDPM++ network)")
    del use_fp16  # fp32 inference (or autocast) instead of EDM's fp16 switch


class EDMPrecond(nn.Module):
    """EDM's preconditioning (Table 1, sigma_data = 0.5): D = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        _precond_args(model_type, use_fp16)
        self.config = dict(precond="EDMPrecond", img_resolution=img_resolution, img_channels=img_channels,
                           label_dim=label_dim, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                           model_type=model_type, **model_kwargs)  # what new_edm rebuilds it from
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, augment_labels=None):
        """sigma: a float, a 0-d tensor (shared by the batch) or one value per sample."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        s2, sd2 = sigma ** 2, self.sigma_data ** 2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (sd2 + s2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), augment_labels)


class VPPrecond(nn.Module):
    """EDM's VP preconditioning (Table 1, Song et al.'s VP SDE): D = x - sigma F(x / sqrt(1 + sigma^2),
    (M - 1) t(sigma)), with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and t(sigma) its inverse."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        _precond_args(model_type, use_fp16)
        self.config = dict(precond="VPPrecond", img_resolution=img_resolution, img_channels=img_channels,
                           label_dim=label_dim, beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t,
                           model_type=model_type, **model_kwargs)
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **model_kwargs)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x, sigma, augment_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return x - sigma * self.model(c_in * x, c_noise.flatten(), augment_labels)


PRECONDS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond}


def new_edm(config=None):
    """Random weights: the paper's DDPM++ EDMPrecond for 32x32 RGB with the fields of `config` replaced (a
    model's whole `.config` rebuilds that model)."""
    c = {"precond": "EDMPrecond", "img_resolution": 32, "img_channels": 3, **DDPMPP_CIFAR10, **(config or {})}
    return PRECONDS[c.pop("precond")](**c)

# ---------------------------------------------------------------- loading


def songunet_config(sd):
    """SongUNet's constructor arguments read off a state dict's shapes (keys `model.…`): resolution,
    channels, channel_mult, num_blocks, attention resolutions, embedding widths, resample filter."""
    def shape(key):
        if key not in sd:
            raise ValueError(f"it has no {key}, so it is not an EDM SongUNet state dict")
        return sd[key].shape

    if any(k.startswith("model.map_label") for k in sd):
        raise ValueError("it is a class-conditional network (model.map_label), which is not implemented here")
    first = [m for k in sd if (m := re.fullmatch(r"model\.enc\.(\d+)x\1_conv\.weight", k))]
    if len(first) != 1:
        raise ValueError("it has no model.enc.RxR_conv.weight, so it is not an EDM SongUNet state dict")
    res = int(first[0][1])
    model_channels, img_channels = shape(first[0][0])[:2]
    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"model\.enc\.(\d+)x\1_", k))}, reverse=True)
    num_blocks = len({m[1] for k in sd if (m := re.match(rf"model\.enc\.{res}x{res}_block(\d+)\.", k))})
    if num_blocks == 0 or levels != [res >> i for i in range(len(levels))]:
        raise ValueError("its encoder blocks do not form an EDM SongUNet (resolutions "
                         f"{levels}, {num_blocks} blocks at {res}x{res})")
    channel_mult = [shape(f"model.enc.{r}x{r}_block0.conv1.weight")[0] // model_channels for r in levels]
    attn_resolutions = sorted({int(m[1]) for k in sd if (m := re.match(r"model\.enc\.(\d+)x\1_block\d+\.qkv\.", k))})
    emb_channels, noise_channels = shape("model.map_layer0.weight")
    resample_filter = [1, 1]
    if len(levels) > 1:  # the buffer is outer(f, f) / sum(f)^2: its first row is proportional to f
        row = sd[f"model.enc.{levels[1]}x{levels[1]}_down.conv0.resample_filter"][0, 0, 0].double()
        resample_filter = (row / row[0]).tolist()
    return dict(img_resolution=res, img_channels=img_channels, model_channels=model_channels,
                channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                channel_mult_emb=emb_channels // model_channels, channel_mult_noise=noise_channels // model_channels,
                augment_dim=shape("model.map_augment.weight")[1] if "model.map_augment.weight" in sd else 0,
                resample_filter=resample_filter)


def _read(path):
    """The object in `path`: torch zip files through torch.load(weights_only=True), anything else (EDM's
    plain pickles of whole modules, legacy torch files) through safe_pickle, which runs none of the file's code."""
    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 (any refusal: the safe unpickler reads what weights_only cannot)
            pass
    try:
        return safe_pickle.load(path)
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not an EDM checkpoint: it cannot be read as a pickle or torch file ({reason})") \
            from None


def _from_pickle(obj):
    """(class, constructor kwargs, state dict) of the `ema` network of an EDM training snapshot."""
    ema = obj["ema"]
    if not isinstance(ema, safe_pickle.Stub):
        raise ValueError(f"its 'ema' is a {type(ema).__name__}, not a pickled network")
    name = safe_pickle.stub_name(ema).rsplit(".", 1)[-1]
    if name not in PRECONDS:
        raise ValueError(f"its 'ema' is a pickled {safe_pickle.stub_name(ema)}, not one of {', '.join(PRECONDS)}")
    state = safe_pickle.stub_state(ema)
    if state.get("_init_args") or not isinstance(state.get("_init_kwargs"), dict):
        raise ValueError(f"its {name} does not record its constructor keywords (_init_kwargs)")
    return PRECONDS[name], dict(state["_init_kwargs"]), safe_pickle.module_state_dict(ema)


def load_edm(path, precond="EDMPrecond"):
    """The EDM denoiser in `path`, in eval mode, on the CPU. Reads EDM's training pickles
    (`network-snapshot-*.pkl`, `edm-cifar10-32x32-uncond-vp.pkl`: class and config from the file, its
    'ema' network) and plain state dicts with keys `model.…` (ADDT's export; config from the shapes;
    `precond` names the preconditioner, which a state dict does not record). Raises FileNotFoundError
    or ValueError with a one-line reason."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EDM checkpoint not found: {path}")
    obj = _read(path)
    try:
        if isinstance(obj, dict) and "ema" in obj:
            cls, kwargs, sd = _from_pickle(obj)
        elif isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("model.") for k in obj):
            if precond not in PRECONDS:
                raise ValueError(f"precond={precond!r}: use one of {', '.join(PRECONDS)}")
            cls, sd = PRECONDS[precond], obj
            kwargs = {**DDPMPP_CIFAR10, **songunet_config(sd)}
        else:
            keys = list(obj)[:4] if isinstance(obj, dict) else []
            raise ValueError(f"it holds a {type(obj).__name__}{f' with keys {keys}' if keys else ''}, neither an "
                             "EDM training pickle (with 'ema') nor a state dict with keys model.…")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{k} is a {type(v).__name__}, not a tensor")
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"weight {k} holds NaN or inf values")
        try:
            net = cls(**kwargs)
        except TypeError as e:  # a constructor keyword this file does not know
            raise ValueError(f"{cls.__name__}: {e}") from None
        missing, unexpected = net.state_dict().keys() - sd.keys(), sd.keys() - net.state_dict().keys()
        if missing or unexpected:
            raise ValueError(f"its weights do not match the {cls.__name__} it describes: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        wrong = [k for k, v in net.state_dict().items() if v.shape != sd[k].shape]
        if wrong:
            raise ValueError(f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, the config gives "
                             f"{tuple(net.state_dict()[wrong[0]].shape)}")
        net.load_state_dict(sd, strict=True)
    except ValueError as e:
        raise ValueError(f"EDM checkpoint {path}: {e}") from None
    return net.eval()
