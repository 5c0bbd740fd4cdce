"""score_sde's NCSN++ in the DDPM++ (deep, continuous VP) configuration that DiffPure runs on CIFAR-10
(Song et al. 2021, `configs/vp/cifar10_ddpmpp_deep_continuous.py`), in plain torch, with score_sde's
parameter names (`all_modules.N...`, as DiffPure builds it: no DataParallel `module.` prefix), so
score_sde checkpoints load with strict name checking.

    from models.ncsnpp import NCSNpp, load_score_sde
    model = load_score_sde("checkpoint_8.pth")    # score_sde checkpoint: its EMA weights, as DiffPure runs them
    eps_hat = model(x, t * 999)                   # x in [-1, 1]; continuous VP time t in [0, 1], one per sample
    model = NCSNpp(dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1))   # fields over DDPMPP_DEEP_CIFAR10
    model = NCSNpp(score_sde_config.model)        # score_sde's own model config dict works too

The network predicts epsilon: DiffPure's score is -model(x, 999 t) / std(t). It implements the one
architecture that config names (BigGAN res blocks, no FIR, no progressive paths, positional
embedding, GroupNorm, swish); a config asking for another raises ValueError.

Needs only torch and numpy (+ safe_pickle.py beside it): copy both into another project as they are.
"""
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import safe_pickle

DDPMPP_DEEP_CIFAR10 = dict(
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), dropout=0.1, skip_rescale=True,
    init_scale=0.0, image_size=32, num_channels=3, centered=True, sigma_min=0.01, sigma_max=50.0, num_scales=1000)
# score_sde config fields with the only value this file implements
FIXED = dict(name="ncsnpp", resblock_type="biggan", fir=False, progressive="none", progressive_input="none",
             embedding_type="positional", attention_type="ddpm", normalization="GroupNorm", nonlinearity="swish",
             scale_by_sigma=False, conditional=True, conv_size=3)
# score_sde config fields that do not change this network (sampling, EMA, unused FIR/Fourier settings)
IGNORED = {"beta_min", "beta_max", "ema_rate", "fourier_scale", "fir_kernel", "progressive_combine",
           "resamp_with_conv", "dataset", "random_flip", "uniform_dequantization"}


def check_config(config=None):
    """DDPMPP_DEEP_CIFAR10 with the given fields replaced; unknown or unsupported fields raise ValueError."""
    c = dict(DDPMPP_DEEP_CIFAR10)
    for key, value in (config or {}).items():
        if key in FIXED:
            if str(value).lower() != str(FIXED[key]).lower():
                raise ValueError(f"unsupported NCSN++ config: {key}={value!r} (this NCSN++ implements {FIXED[key]!r})")
        elif key in c:
            c[key] = tuple(value) if key in ("ch_mult", "attn_resolutions") else value
        elif key not in IGNORED:
            raise ValueError(f"unknown NCSN++ config field {key!r}")
    return c


def default_init_(w, scale=1.0):
    """score_sde's default_init (DDPM's): uniform variance scaling with fan_avg; scale 0 means 1e-10."""
    fan_avg = (w.shape[0] + w.shape[1]) * math.prod(w.shape[2:]) / 2
    with torch.no_grad():
        return w.uniform_(-1, 1).mul_(math.sqrt(3 * (scale or 1e-10) / fan_avg))


def conv(cin, cout, kernel=3, init_scale=1.0):
    c = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    default_init_(c.weight, init_scale)
    nn.init.zeros_(c.bias)
    return c


def dense(cin, cout):
    d = nn.Linear(cin, cout)
    default_init_(d.weight)
    nn.init.zeros_(d.bias)
    return d


def group_norm(ch):
    return nn.GroupNorm(min(ch // 4, 32), ch, eps=1e-6)


def timestep_embedding(labels, dim, max_positions=10000):
    """DDPM's sinusoidal embedding [sin, cos] of the (float) labels, in float32 (float64 for float64 labels)."""
    dtype = torch.float64 if labels.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=labels.device) * -(math.log(max_positions) / (half - 1)))
    arg = labels.to(dtype)[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1), (0, dim % 2))


class NIN(nn.Module):
    """A per-position linear map over channels, weight W (in, out); acts on channels-last input (..., in)."""

    def __init__(self, cin, cout, init_scale=0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(cin, cout), init_scale))
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return x @ self.W + self.b


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (score_sde's AttnBlockpp)."""

    def __init__(self, ch, init_scale=0.0, skip_rescale=True):
        super().__init__()
        self.GroupNorm_0 = group_norm(ch)
        self.NIN_0, self.NIN_1, self.NIN_2 = NIN(ch, ch), NIN(ch, ch), NIN(ch, ch)
        self.NIN_3 = NIN(ch, ch, init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        h = F.scaled_dot_product_attention(q, k, v).to(q.dtype)  # softmax(q k^T / sqrt(C)) v, as upstream
        h = self.NIN_3(h).transpose(1, 2).reshape(B, C, H, W)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlock(nn.Module):
    """score_sde's ResnetBlockBigGANpp without FIR: nearest-neighbour up or 2x2-mean down inside the block."""

    def __init__(self, cin, cout, temb_dim, up=False, down=False, dropout=0.1, skip_rescale=True, init_scale=0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(cin)
        self.Conv_0 = conv(cin, cout)
        self.Dense_0 = dense(temb_dim, cout)
        self.GroupNorm_1 = group_norm(cout)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv(cout, cout, init_scale=init_scale)
        self.Conv_2 = conv(cin, cout, kernel=1) if cin != cout or up or down else None
        self.up, self.down, self.skip_rescale = up, down, skip_rescale

    def forward(self, x, temb):
        h = F.silu(self.GroupNorm_0(x))
        if self.up:
            h, x = (F.interpolate(v, scale_factor=2.0, mode="nearest") for v in (h, x))
        elif self.down:
            h, x = (F.avg_pool2d(v, 2) for v in (h, x))
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class NCSNpp(nn.Module):
    """The U-Net of score_sde's NCSNpp; `all_modules` is the flat list upstream builds, in the same order:
    two time-embedding Linears, the input conv, the down path (per level: num_res_blocks x (block
    [+ attention]), then a down block), the middle (block, attention, block), the up path (per level:
    num_res_blocks + 1 blocks on [h, skip] [+ attention], then an up block), GroupNorm and the output conv."""

    def __init__(self, config=None):
        super().__init__()
        self.config = c = check_config(config)
        nf, L, n = c["nf"], len(c["ch_mult"]), c["num_res_blocks"]
        self.nf, self.num_res_blocks, self.centered = nf, n, c["centered"]
        self.attn_levels = [c["image_size"] // 2 ** i in c["attn_resolutions"] for i in range(L)]
        # unused by the positional-embedding model, kept so that upstream state dicts match key for key
        sigmas = np.exp(np.linspace(np.log(c["sigma_max"]), np.log(c["sigma_min"]), c["num_scales"]))
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float64))

        block = functools.partial(ResnetBlock, temb_dim=4 * nf, dropout=c["dropout"], skip_rescale=c["skip_rescale"],
                                  init_scale=c["init_scale"])
        attn = functools.partial(AttnBlock, init_scale=c["init_scale"], skip_rescale=c["skip_rescale"])
        modules = [dense(nf, 4 * nf), dense(4 * nf, 4 * nf), conv(c["num_channels"], nf)]
        skips, ch = [nf], nf
        for level in range(L):
            for _ in range(n):
                modules.append(block(ch, nf * c["ch_mult"][level]))
                ch = nf * c["ch_mult"][level]
                if self.attn_levels[level]:
                    modules.append(attn(ch))
                skips.append(ch)
            if level != L - 1:
                modules.append(block(ch, ch, down=True))
                skips.append(ch)
        modules += [block(ch, ch), attn(ch), block(ch, ch)]
        for level in reversed(range(L)):
            for _ in range(n + 1):
                modules.append(block(ch + skips.pop(), nf * c["ch_mult"][level]))
                ch = nf * c["ch_mult"][level]
            if self.attn_levels[level]:
                modules.append(attn(ch))
            if level != 0:
                modules.append(block(ch, ch, up=True))
        modules += [group_norm(ch), conv(ch, c["num_channels"], init_scale=c["init_scale"])]
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x, labels):
        """x (B, C, H, W) in [-1, 1]; labels: the float label 999 t per sample (B,), or one for all.
        Returns the epsilon prediction."""
        labels = torch.as_tensor(labels, device=x.device).reshape(-1).expand(x.shape[0])
        m = iter(self.all_modules)
        temb = next(m)(timestep_embedding(labels, self.nf).to(x.dtype))
        temb = next(m)(F.silu(temb))
        if not self.centered:
            x = 2 * x - 1
        hs = [next(m)(x)]
        L = len(self.attn_levels)
        for level in range(L):
            for _ in range(self.num_res_blocks):
                h = next(m)(hs[-1], temb)
                hs.append(next(m)(h) if self.attn_levels[level] else h)
            if level != L - 1:
                hs.append(next(m)(hs[-1], temb))
        h = next(m)(hs[-1], temb)
        h = next(m)(h)
        h = next(m)(h, temb)
        for level in reversed(range(L)):
            for _ in range(self.num_res_blocks + 1):
                h = next(m)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_levels[level]:
                h = next(m)(h)
            if level != 0:
                h = next(m)(h, temb)
        norm, out = next(m), next(m)
        return out(F.silu(norm(h)))


# ---------------------------------------------------------------- loading score_sde checkpoints

def infer_config(sd):
    """nf, num_channels, ch_mult, num_res_blocks and attn_resolutions from an NCSN++ state dict (no prefix).
    Res blocks are the modules with Conv_0; the down and up blocks are those with Conv_2 and a square Conv_0."""
    if "all_modules.2.weight" not in sd or sd["all_modules.2.weight"].dim() != 4:
        raise ValueError("not an NCSN++ state dict: no input conv all_modules.2.weight")
    nf, channels = sd["all_modules.2.weight"].shape[:2]
    index = sorted({int(k.split(".")[1]) for k in sd if k.startswith("all_modules.")})
    kinds = []  # per module: ('block', cin, cout, resample) or ('attn',) or ('other',)
    for i in index:
        w = sd.get(f"all_modules.{i}.Conv_0.weight")
        if w is not None:
            resample = f"all_modules.{i}.Conv_2.weight" in sd and w.shape[0] == w.shape[1]
            kinds.append(("block", w.shape[1], w.shape[0], resample))
        else:
            kinds.append(("attn",) if f"all_modules.{i}.NIN_0.W" in sd else ("other",))
    blocks = [k for k in kinds if k[0] == "block"]
    L = sum(k[3] for k in blocks) // 2 + 1
    n = (len(blocks) - 3 * L) // (2 * L)  # blocks: down L n + (L - 1), middle 2, up L (n + 1) + (L - 1)
    if n < 1 or len(blocks) != 2 * L * n + 3 * L:
        raise ValueError("not an NCSN++ (DDPM++) state dict: its res blocks do not form a U-Net")
    ch_mult, attn_res, size = [], [], DDPMPP_DEEP_CIFAR10["image_size"]
    pos = 3  # module index of the level's first block
    for level in range(L):
        ch_mult.append(int(kinds[pos][2]) // int(nf))
        attention = kinds[pos + 1][0] == "attn"
        if attention:
            attn_res.append(size // 2 ** level)
        pos += n * (1 + attention) + (level != L - 1)
    return dict(nf=int(nf), num_channels=int(channels), ch_mult=tuple(ch_mult), num_res_blocks=n,
                attn_resolutions=tuple(attn_res))


def _strip_module(sd):
    """DataParallel's `module.` prefix off every key (score_sde's create_model wraps the model)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def _check_finite(named, path):
    for key, t in named:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: {key} holds non-finite values (NaN or inf)")


def _build(sd, config, path):
    """The NCSNpp whose keys and shapes equal sd's (config inferred when None); a clear error otherwise."""
    model = NCSNpp(config if config is not None else infer_config(sd))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the NCSN++ config {model.config}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} ({len(missing)} + {len(unexpected)} keys)")
    for key, t in expected.items():
        if t.shape != sd[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(sd[key].shape)}, the config {model.config} "
                             f"gives {tuple(t.shape)}")
    return model


def load_score_sde(path, config=None):
    """The NCSNpp of a score_sde checkpoint (eval mode, CPU), read without running any pickled code.

    A score_sde `checkpoint_*.pth` ({'model', 'ema', 'optimizer', 'step'}) gives its EMA weights, copied
    BY PARAMETER ORDER from ema['shadow_params'] as DiffPure's `ema.copy_to(model.parameters())` does
    ('model' only names and checks the layout); the buffer `sigmas` comes from the constructor and
    must equal the file's. A plain state dict (e.g. an export of our own training), with or without
    `module.`, loads with strict name checking. config: NCSNpp fields; None infers them from the shapes.
    Raises FileNotFoundError or ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no score_sde checkpoint at {path}")
    try:
        ckpt = safe_pickle.load(path, strict=True)
    except Exception as e:  # a hostile or broken file: nothing in it ran, say why it was refused
        raise ValueError(f"{path} is not a plain-data torch checkpoint ({type(e).__name__}: {e})") from e
    if _is_state_dict(ckpt):
        sd = _strip_module(ckpt)
        model = _build(sd, config, path)
        _check_finite(sd.items(), path)
        model.load_state_dict(sd, strict=True)
        return model.eval()
    if not (isinstance(ckpt, dict) and _is_state_dict(ckpt.get("model"))
            and isinstance(ckpt.get("ema"), dict) and isinstance(ckpt["ema"].get("shadow_params"), (list, tuple))):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is neither a score_sde checkpoint ({{'model', 'ema': {{'shadow_params'}}}}) "
                         f"nor a state dict: found {keys}")
    sd = _strip_module(ckpt["model"])
    model = _build(sd, config, path)
    for name, buf in model.named_buffers():  # the constructor's, as in DiffPure (libm's exp may differ in the last bit)
        if not torch.allclose(buf, sd[name].to(buf.dtype), rtol=1e-12, atol=0):
            raise ValueError(f"{path}: buffer {name} differs from the one the NCSN++ config {model.config} builds")
    params, shadow = list(model.named_parameters()), ckpt["ema"]["shadow_params"]
    if len(shadow) != len(params):
        raise ValueError(f"{path}: ema holds {len(shadow)} shadow params, the model has {len(params)} parameters")
    for (name, p), s in zip(params, shadow):
        if not torch.is_tensor(s) or s.shape != p.shape:
            raise ValueError(f"{path}: ema shadow param for {name} has shape "
                             f"{tuple(s.shape) if torch.is_tensor(s) else type(s).__name__}, expected {tuple(p.shape)}")
    _check_finite(((name, s) for (name, _), s in zip(params, shadow)), path)
    with torch.no_grad():
        for (_, p), s in zip(params, shadow):
            p.copy_(s)
    return model.eval()
