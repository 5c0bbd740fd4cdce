"""RobustBench's DMWideResNet (DeepMind's WideResNet of Gowal et al. 2020 and Rebuffi et al. 2021,
also Wang et al. 2023) with RobustBench's parameter names, so its checkpoints load with strict=True.

    net = DMWideResNet(num_classes=10, depth=70, width=16)
    net.load_state_dict(torch.load("Gowal2020Uncovering_70_16_extra.pt", weights_only=True))

Takes RAW [0, 1] images: the network normalises inside its forward with its own mean and std
(non-persistent buffers, so not in the state dict; CIFAR-10 std (0.2471, 0.2435, 0.2616) by default,
which is not the wide-resnet.pytorch std). Swish is x * sigmoid(x); Wang2023's nn.SiLU computes the
same function, differing by float rounding only (< 4e-6 on the logits).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def swish(x):
    return x * torch.sigmoid(x)


class Block(nn.Module):
    """Pre-activation block; conv_0 has padding=0 and pads by hand to mimic TensorFlow's 'SAME'."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        # as upstream: a shortcut exactly when the width changes, whatever the stride
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if in_planes != out_planes else None
        self.stride = stride

    def forward(self, x):
        out = swish(self.batchnorm_0(x))
        if self.shortcut is not None:  # the projection sees the activated input, the identity the raw one
            x = out
        # 'SAME' padding: symmetric at stride 1, bottom/right only at stride 2
        out = self.conv_0(F.pad(out, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)))
        out = self.conv_1(swish(self.batchnorm_1(out)))
        return (x if self.shortcut is None else self.shortcut(x)) + out


class BlockGroup(nn.Module):
    """Exists only so that keys read `layer.0.block.1...` as upstream."""

    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.block = nn.Sequential(*[Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    def __init__(self, num_classes=10, depth=28, width=10, mean=CIFAR10_MEAN, std=CIFAR10_STD, padding=0):
        super().__init__()
        assert (depth - 4) % 6 == 0 and depth >= 10, f"DMWideResNet depth must be 6n+4 with n >= 1, got {depth}"
        n = (depth - 4) // 6
        c = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes, self.padding = num_classes, padding
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(BlockGroup(n, c[0], c[1], 1), BlockGroup(n, c[1], c[2], 2),
                                   BlockGroup(n, c[2], c[3], 2))
        self.batchnorm = nn.BatchNorm2d(c[3])
        self.logits = nn.Linear(c[3], num_classes)

    def forward(self, x):
        if self.padding > 0:
            x = F.pad(x, (self.padding,) * 4)
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = swish(self.batchnorm(out))
        return self.logits(F.avg_pool2d(out, 8).flatten(1))  # upstream pools 8x8: 32x32 inputs only


def dm_arch(sd):
    """'dm-wrn-DEPTH-WIDTH' of a DMWideResNet state dict (keys `init_conv.weight`, `layer.0.block.0...`)."""
    n = len({k.split(".")[3] for k in sd if k.startswith("layer.0.block.")})
    return f"dm-wrn-{6 * n + 4}-{sd['layer.0.block.0.conv_0.weight'].shape[0] // 16}"
