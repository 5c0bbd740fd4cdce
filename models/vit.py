"""ViT (Dosovitskiy et al. 2021) with the parameter names of Hugging Face's ViTForImageClassification
as checkpoints store them (`vit.encoder.layer.N.attention.attention.query.weight`, ..., `classifier`),
so a Hub folder (config.json + model.safetensors or pytorch_model.bin) loads with strict=True.
No transformers needed at run time.

    net, sd, mean, std = read_hf_vit("vit-base-patch16-224-in21k-finetuned-cifar10")
    net.load_state_dict(sd)

Takes normalised image_size x image_size inputs; the classifier wrapper resizes CIFAR images to it.
Inference only: no dropout (ViT-B configs set every dropout to 0).
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

VIT_B_16 = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072)
ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _holder(**children):
    """A bare container: the nesting exists only to reproduce HF's names."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


class Layer(nn.Module):
    """Pre-LN transformer layer: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden, heads, intermediate, eps, qkv_bias, act):
        super().__init__()
        self.heads, self.act = heads, ACTIVATIONS[act]
        self.layernorm_before = nn.LayerNorm(hidden, eps=eps)
        self.attention = _holder(
            attention=_holder(query=nn.Linear(hidden, hidden, qkv_bias), key=nn.Linear(hidden, hidden, qkv_bias),
                              value=nn.Linear(hidden, hidden, qkv_bias)),
            output=_holder(dense=nn.Linear(hidden, hidden)))
        self.layernorm_after = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = _holder(dense=nn.Linear(hidden, intermediate))
        self.output = _holder(dense=nn.Linear(intermediate, hidden))

    def forward(self, x):
        B, N, C = x.shape
        h, att = self.layernorm_before(x), self.attention.attention
        q, k, v = (lin(h).view(B, N, self.heads, C // self.heads).transpose(1, 2)
                   for lin in (att.query, att.key, att.value))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.attention.output.dense(h)
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class ViT(nn.Module):
    def __init__(self, num_classes=10, image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-12, qkv_bias=True,
                 hidden_act="gelu"):
        super().__init__()
        assert image_size % patch_size == 0, f"image_size {image_size} is not a multiple of patch_size {patch_size}"
        self.num_classes, self.image_size = num_classes, image_size
        self.config = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                           num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                           intermediate_size=intermediate_size)
        n_tokens = (image_size // patch_size) ** 2 + 1
        embeddings = _holder(patch_embeddings=_holder(projection=nn.Conv2d(3, hidden_size, patch_size, patch_size)))
        embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        embeddings.position_embeddings = nn.Parameter(torch.zeros(1, n_tokens, hidden_size))
        for p in (embeddings.cls_token, embeddings.position_embeddings):
            nn.init.trunc_normal_(p, std=0.02)
        layers = [Layer(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps, qkv_bias, hidden_act)
                  for _ in range(num_hidden_layers)]
        self.vit = _holder(embeddings=embeddings, encoder=_holder(layer=nn.ModuleList(layers)),
                           layernorm=nn.LayerNorm(hidden_size, eps=layer_norm_eps))
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        emb = self.vit.embeddings
        x = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)  # (B, patches, C), row-major patches
        x = torch.cat([emb.cls_token.expand(len(x), -1, -1), x], 1) + emb.position_embeddings
        for layer in self.vit.encoder.layer:
            x = layer(x)
        return self.classifier(self.vit.layernorm(x)[:, 0])  # the [CLS] token


CONFIG_KEYS = ["image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "layer_norm_eps", "qkv_bias", "hidden_act"]


def read_hf_vit(path):
    """(ViT built from config.json, its state dict, mean, std) from a Hugging Face
    ViTForImageClassification folder or a weights file inside one. mean/std come from
    preprocessor_config.json when present, else HF ViT's default 0.5/0.5. ValueError with a one-line
    reason when the folder does not fit."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "vit":
        raise ValueError(f"its config.json is for model_type {config.get('model_type')!r}, not 'vit'")
    if config.get("num_channels", 3) != 3 or config.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ValueError(f"config.json asks for num_channels {config.get('num_channels')} and hidden_act "
                         f"{config.get('hidden_act')!r}; only 3 channels and {', '.join(ACTIVATIONS)} are supported")
    names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, n))]
    weights = path if os.path.isfile(path) else os.path.join(folder, names[0]) if names else None
    if weights is None:
        raise ValueError("it has neither model.safetensors nor pytorch_model.bin")
    if weights.endswith(".safetensors"):
        sd = load_file(weights, device="cpu")
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.startswith("vit.pooler.")}  # ViTModel's pooler: unused here
    if "classifier.weight" not in sd:
        raise ValueError("it has no classifier.weight: not a ViTForImageClassification checkpoint")
    net = ViT(sd["classifier.weight"].shape[0], **{k: config[k] for k in CONFIG_KEYS if k in config})
    mean, std = (0.5,) * 3, (0.5,) * 3
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            pre = json.load(f)
        if pre.get("do_normalize", True):
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        else:
            mean, std = (0.0,) * 3, (1.0,) * 3
    return net, sd, tuple(mean), tuple(std)
