"""Small helpers shared by the scripts: errors for bad input and flag checks, torchrun set-up, the
output folder (checked first, locked, stale temporary files removed), atomic writes, JSON-lines files
that survive a cut line, per-sample seeds and keyed noise (all randomness is keyed, so no RNG state is
saved), precision and a progress line with ETA."""
import errno
import fcntl
import glob
import importlib
import io
import json
import math
import os
import shutil
import sys
import time
import types
import warnings
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


def load_kernel(name):
    """kernels/NAME.py, imported as `addt_kernels.NAME`. The folder shares its name with the PyPI package
    `kernels` (which transformers 5 imports), so it has no __init__.py and is never imported as `kernels`:
    whichever `kernels` a user has installed stays the one other libraries get, in the same process too."""
    if "addt_kernels" not in sys.modules:
        package = types.ModuleType("addt_kernels")
        package.__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")]
        sys.modules["addt_kernels"] = package
    return importlib.import_module(f"addt_kernels.{name}")


class UserError(Exception):
    """Bad input from the user (missing file, wrong flag combination): printed as one line."""


def run_main(main):
    """Call main(); a UserError becomes 'error: ...' on stderr and exit status 2, no traceback.

    Under torchrun an error that every process meets alike (a flag, checked before the process group
    exists; an error Dist.agree shares) is printed once, by rank 0, and every process exits 0: torchrun
    would report any other exit status as a crash, with a banner and a traceback hint of its own. Other
    errors exit 2 on the rank that meets them, and torchrun stops the other processes."""
    rank = os.environ.get("RANK")  # set by torchrun
    if rank not in (None, "0"):
        _hold_stderr()  # argparse prints its error on every rank: rank 0's copy is enough
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # gloo aborts a process ("terminate called") whose peer tears down the group first
    except (UserError, SystemExit) as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        grouped = dist.is_available() and dist.is_initialized()
        shared = rank is not None and (isinstance(e, SharedError) or not grouped)
        _release_stderr(discard=shared)
        if isinstance(e, UserError) and (not shared or rank == "0"):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(0 if shared else 2 if isinstance(e, UserError) else e.code)
    finally:
        _release_stderr()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class SharedError(UserError):
    """A UserError every process of the run raises (Dist.agree shares the master's)."""


_HELD = []  # [the real stderr] while a torchrun rank other than 0 holds back what it prints before Dist()


def _hold_stderr():
    _HELD.append(sys.stderr)
    sys.stderr = io.StringIO()


def _release_stderr(discard=False):
    """Put the real stderr back (writing out what was held, unless discarded)."""
    if _HELD:
        held, sys.stderr = sys.stderr, _HELD.pop()
        if not discard:
            sys.stderr.write(held.getvalue())


class Dist:
    """Process layout under torchrun (nanoGPT style); one process when RANK is unset."""

    def __init__(self, device=None):
        _release_stderr()  # the flags passed: from here on every rank speaks for itself
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

    def agree(self, fn):
        """Run fn() on the master only (taking a lock, say) and make every process raise its UserError,
        so no rank waits forever for a master that has stopped."""
        error = None
        if self.master:
            try:
                fn()
            except UserError as e:
                error = str(e)
        if self.ddp:
            box = [error]
            dist.broadcast_object_list(box, 0)
            error = box[0]
        if error is not None:
            raise SharedError(error)


# ---------------------------------------------------------------- flag checks (one line, exit 2)

def require(ok, message):
    if not ok:
        raise UserError(message)


def parse_ints(text, flag):
    """'5,10,20' -> [5, 10, 20] (positive integers), for list-valued flags."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, not {text!r}") from None
    require(values and all(v >= 1 for v in values), f"{flag} takes positive integers, not {text!r}")
    return values


def check_positive(args, *names, allow_none=True):
    """Each --name must be a positive int/float (None allowed: a default fills it later)."""
    for n in names:
        v = getattr(args, n)
        if v is None and allow_none:
            continue
        require(v is not None and math.isfinite(v) and v > 0, f"--{n.replace('_', '-')} must be positive, not {v}")


def check_range(args, name, lo, hi, lo_open=False, hi_open=False):
    """--name within [lo, hi] (open ends as asked), and not NaN."""
    v = getattr(args, name)
    if v is None:
        return
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    require(ok, f"--{name.replace('_', '-')} must lie in {interval}, not {v}")


def check_device(name):
    """A --device string torch knows, and CUDA only where there is one (never a silent CPU run
    recorded as cuda)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device torch knows (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        require(device.index is None or device.index < torch.cuda.device_count(),
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")


# ---------------------------------------------------------------- the output folder

def check_out_dir(out):
    """--out must be creatable and writable: refused before any loading or computation."""
    path = os.path.abspath(out)
    require(not os.path.exists(path) or os.path.isdir(path), f"--out {out} is a file, not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    require(os.path.isdir(parent), f"--out {out} lies under {parent}, which is a file")
    require(os.access(parent, os.W_OK | os.X_OK), f"--out {out}: {parent} is not writable")


_LOCKS = {}  # folder -> file descriptor holding its lock, for this process's lifetime


def lock_out(out):
    """One run per output folder: an exclusive fcntl lock on OUT/.lock, held until the process ends
    (the kernel releases it on any exit, kill -9 included, so a lock is never stale; the PID written
    into the file only names the holder). A process may take the same folder again (tests call main()
    several times). On taking the lock, temporary files that an interrupted write left behind
    (*.tmp, *.tmp/) are removed."""
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"another run (pid {holder}) is writing to {out}; wait for it to finish or use "
                        "another --out") from None
    before = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if before and before != str(os.getpid()) and not _alive(before):
        print(f"note: an earlier run in {out} (pid {before}) stopped before it finished; its complete "
              "outputs are kept", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd
    remove_stale_tmp(out)


def unlock_out(out):
    """Release the folder at the end of a finished run (the PID is cleared: nothing stopped early)."""
    fd = _LOCKS.pop(os.path.realpath(out), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(out):
    """Temporary files of interrupted atomic writes in OUT (NAME.PID.tmp, DIR.tmp/): only called under
    the lock. Not recursive: subfolders may be other runs with locks of their own."""
    for path in glob.glob(os.path.join(glob.escape(out), "*.tmp")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def atomic_write_bytes(path, write):
    """write(tmp_path) then rename, so an interruption never leaves a half-written file. A failed write
    (disk full, say) removes the temporary file, keeps the previous file and says so in one line."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # normal modes: some writers (safetensors) create files 0600
        os.replace(tmp, path)
    except OSError as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        kept = "; the previous file is intact" if os.path.exists(path) else ""
        raise UserError(f"could not write {path}: {os_reason(e)}{kept}") from None


def os_reason(e):
    return "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def torch_save(obj, path):
    """torch.save through a Python file, so that a full disk raises OSError(ENOSPC): torch.save(path)
    raises only a RuntimeError ('unexpected pos ...') that names no cause, and with a file object
    torch's zip writer still hides the OSError behind one when it closes the archive."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


def atomic_save(obj, path):
    atomic_write_bytes(path, lambda tmp: torch_save(obj, tmp))


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
    atomic_write_bytes(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write_bytes(path, write)


def refuse_overwrite(path, resume, flag="--resume to continue that run"):
    """A run started without --resume must not silently replace an earlier run's results."""
    if not resume and os.path.exists(path):
        raise UserError(f"{path} exists: pass {flag}, or another --out")


# ---------------------------------------------------------------- JSON lines that survive a cut line

def read_jsonl(path, repair=False):
    """The rows of a JSON-lines file. A last line cut by an interruption (no newline, or not JSON) is
    dropped; with repair=True it is also cut from the file, so that appending continues cleanly."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good = [], 0
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is never complete
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line) + 1
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def append_jsonl(path, rows):
    """Append rows as one write of whole lines, flushed to disk: an interruption cuts at most the last line.
    A failed write (disk full) cuts the file back to what it held, so no partial line stays behind."""
    data = memoryview("".join(json.dumps(r) + "\n" for r in rows).encode())
    fd, size = None, None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(fd).st_size
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as e:
        if size is not None:
            os.ftruncate(fd, size)  # shrinking needs no space
        raise UserError(f"could not append to {path}: {os_reason(e)}; its earlier lines are intact") from None
    finally:
        if fd is not None:
            os.close(fd)


def read_json(path, what):
    """A JSON file written by an earlier run, with a one-line error when it is cut or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{what} {path} is unreadable (cut by an interruption?); remove it and rerun "
                        "with --resume") from None


def check_finite_weights(state, source):
    """Refuse weights with NaN or inf (a diverged run): every number computed from them would be
    meaningless. state: a state dict, or any nest of dicts and lists of tensors (a training checkpoint
    with its EMA and optimizer state)."""
    for name, v in _tensors(state):
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{source} holds non-finite weights (NaN or inf in {name}); it comes from a diverged "
                            "run: use an earlier checkpoint")


def _tensors(obj, prefix=""):
    """(dotted name, tensor) of every tensor in a nest of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))


def unreadable_reason(path, error=None):
    """Why a file torch.load (weights_only) refused is no checkpoint we read, from its first bytes; never
    torch's advice to retry with weights_only=False (which would let the file run code). error: what a
    safe reader of pickles (models/safe_pickle.py) raised on it, if one was tried."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "a cut zip archive, not a complete torch checkpoint (truncated?)"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "not a checkpoint (neither torch's zip format nor a pickle)"
    what = "a torch checkpoint" if head[:1] == b"P" else "a pickle"
    if error is None:
        return f"{what} holding pickled Python objects, which are not loaded since unpickling can run code"
    first = str(error).strip().splitlines()[0] if str(error).strip() else "-"
    return f"{what} that could not be read ({type(error).__name__}: {first})"


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True) with one-line errors for a missing, empty, cut or foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" on a foreign file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (a truncated or foreign file: torch raises many types)
        raise UserError(f"could not read {what} {path}: {unreadable_reason(path)}") from None


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


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune"]


def prepare_model(model, device, channels_last=False, compile=False, train=False):
    """On device, in eval mode with frozen weights (attacks take gradients w.r.t. inputs only; train=True
    keeps the mode and the weights' gradients), channels_last on request, and torch.compile'd when
    `compile` is True or one of COMPILE_MODES ('reduce-overhead' adds CUDA graphs). The eager module
    stays reachable as `eager_module(model)`: memory estimates run it (see addt_attacks.Defense)."""
    model = model.to(device)
    if not train:
        model = model.eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not compile:
        return model
    return torch.compile(model, mode=None if compile in (True, "default") else compile)


def eager_module(model):
    """The module a torch.compile'd one wraps (the module itself when it is not compiled)."""
    return getattr(model, "_orig_mod", model)


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
