"""Small helpers shared by the scripts: errors for bad input, torchrun set-up, atomic writes,
per-sample seeds (all randomness is keyed, so no RNG state is saved), precision and a progress line
with ETA."""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user (missing file, wrong flag combination): printed as one line."""


def run_main(main):
    """Call main(); a UserError becomes 'error: ...' on stderr and exit status 2, no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class Dist:
    """Process layout under torchrun (nanoGPT style); one process when RANK is unset."""

    def __init__(self, device=None):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        cuda = torch.cuda.is_available() and device != "cpu"
        if self.ddp:
            dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        if device and device != "cuda":
            self.device = torch.device(device)
        elif cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.master = self.rank == 0

    def all_sum(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.ddp:
            dist.barrier()


def atomic_write_bytes(path, write):
    """write(tmp_path) then rename, so an interruption never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj, path):
    atomic_write_bytes(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
    atomic_write_bytes(path, write)


def refuse_overwrite(path, resume):
    """A run started without --resume must not silently replace an earlier run's results."""
    if not resume and os.path.exists(path):
        raise UserError(f"{path} exists: pass --resume to continue that run, or another --out")


def load_checkpoint(path, what="checkpoint"):
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"could not read {what} {path}: {e}") from e


def sample_seed(*key):
    """A 63-bit seed from a tuple of non-negative ints, e.g. (seed, image index, pgd step, draw).
    Results keyed this way do not depend on batch size, process count or resume point."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _int64(c):
    return c - 2 ** 64 if c >= 2 ** 63 else c


_GOLDEN, _C1, _C2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _mix64(x):
    """splitmix64's finaliser on int64 tensors (wrapping products; >> made logical by a mask)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _C1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _C2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def keyed_normal(keys, draw, shape, device):
    """Standard normals of shape (len(keys), *shape), float32: element e of row b is a pure function of
    (keys[b], draw, e), computed by hashing (counter-based, Box-Muller on 2 x 24 bits). No generator
    state and no per-row launches: a draw does not depend on its batch neighbours, the batch size,
    the process count or the device type (CPU and CUDA agree up to the last bit of log/cos)."""
    keys = torch.as_tensor(keys, dtype=torch.int64, device=device)
    row = _mix64(keys ^ _mix64(torch.tensor(int(draw) + 1, dtype=torch.int64, device=device)))
    n = math.prod(shape)
    h = _mix64(row[:, None] + (torch.arange(1, n + 1, dtype=torch.int64, device=device) * _GOLDEN))
    u1 = (((h >> 40) & 0xFFFFFF) + 1).to(torch.float32) * 2.0 ** -24  # (0, 1]: the log stays finite
    u2 = (h & 0xFFFFFF).to(torch.float32) * 2.0 ** -24
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.view(len(keys), *shape)


class Progress:
    """Prints 'label i/n  rate  ETA' at most every `every` seconds (master process only)."""

    def __init__(self, total, label="", unit="it", every=10.0, enabled=True):
        self.total, self.label, self.unit, self.every, self.enabled = total, label, unit, every, enabled
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n=1, extra=""):
        self.done += n
        now = time.time()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        print(f"{self.label} {self.done}/{self.total}  {rate:.2f} {self.unit}/s  "
              f"ETA {format_seconds(eta)}  {extra}".rstrip(), flush=True)

    @property
    def elapsed(self):
        return time.time() - self.start


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def markdown_table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def prepare_model(model, device, channels_last=False, compile=False):
    """Eval mode, frozen weights (attacks take gradients w.r.t. inputs only), on device."""
    model = model.to(device).eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def resolve_precision(precision, device):
    """'auto' is bf16 autocast on CUDA and fp32 elsewhere (on CPU bf16 gains little and costs accuracy).
    Sets the process-wide TF32 switches once: on for 'tf32' only."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return precision


def autocast(device, precision):
    """bf16 autocast for precision 'bf16' (CUDA or CPU); fp32 and tf32 run without autocast."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
