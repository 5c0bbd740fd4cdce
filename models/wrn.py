"""WideResNet (Zagoruyko & Komodakis 2016) with RobustBench's parameter names, so its checkpoints
load with strict=True and no remapping. Stands alone: copy it anywhere torch is installed.

    net = WideResNet(depth=28, widen_factor=10, num_classes=10)
    load_robustbench_state_dict(net, torch.load("Standard.pt", weights_only=True))

Takes normalised inputs; 32x32 and 64x64 both work (global average pooling before `fc`).
"""
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut."""

    def __init__(self, in_planes, out_planes, stride, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        # upstream decides on channels alone: an equal-width block never changes the stride
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # as upstream: the projection shortcut sees the activated input, the identity the raw one
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, self.dropout, self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One stage of n blocks; exists only so that keys read `block1.layer.0...` as upstream."""

    def __init__(self, n, in_planes, out_planes, stride, dropout):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1, dropout) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen_factor=10, num_classes=10, dropout=0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0 and depth >= 10, f"WideResNet depth must be 6n+4 with n >= 1, got {depth}"
        n = (depth - 4) // 6
        c = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, c[0], c[1], 1, dropout)
        self.block2 = NetworkBlock(n, c[1], c[2], 2, dropout)
        self.block3 = NetworkBlock(n, c[2], c[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)
        for m in self.modules():  # upstream's init: He normal over fan-out, zero fc bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def robustbench_state_dict(obj):
    """The bare state dict inside a RobustBench-style checkpoint: unwraps {'state_dict': ...},
    {'model': ...} or {'net': ...}, strips DataParallel's 'module.' prefixes (and a 'model.' prefix
    on every key, as robustbench.utils.load_model does) and drops the `sub_block1.*` stage that some
    RobustBench WRNs define but never use in forward."""
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    obj = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if obj and all(k.startswith("model.") for k in obj):
        obj = {k.removeprefix("model."): v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if not k.startswith("sub_block1.")}


def state_dict_mismatch(model, sd, show=5):
    """'' when sd fits model exactly, else a short list of missing/unexpected/misshapen keys."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in sd and tuple(getattr(sd[k], "shape", ())) != tuple(v.shape)]

    def few(name, items):
        more = f" (+{len(items) - show} more)" if len(items) > show else ""
        return f"{name} {len(items)}: {', '.join(items[:show])}{more}" if items else None
    parts = [few("missing keys", missing), few("unexpected keys", unexpected),
             few("shape mismatches (checkpoint vs model)", shapes)]
    return "; ".join(p for p in parts if p)


def load_robustbench_state_dict(model, obj):
    """Strictly load a RobustBench-style checkpoint (see robustbench_state_dict) into model;
    ValueError naming the first few offending keys when it does not fit."""
    sd = robustbench_state_dict(obj)
    problems = state_dict_mismatch(model, sd)
    if problems:
        raise ValueError(problems)
    model.load_state_dict(sd, strict=True)
    return model
