"""Read the weights out of pickled checkpoints WITHOUT running any of the pickle's code.

Whole-module pickles (wide-resnet.pytorch's `.t7`, EDM's `network-snapshot-*.pkl`, score_sde's
`checkpoint_*.pth` with its numpy scalars) cannot be opened with `torch.load(weights_only=True)`,
and `weights_only=False` would let the file run arbitrary code. Here every class or function the
pickle names is replaced by an inert stand-in (`Stub`) that only records its arguments and state,
except a short allow-list of data constructors (tensors, storages, OrderedDict, set, numpy scalars)
that are rebuilt by the code below. A pickle whose class has a `__reduce__` that would call
`os.system` thus yields a Stub recording that call, and nothing runs.

    obj = load("origin.t7")                     # torch zip or legacy format, or a plain pickle
    sd = module_state_dict(obj["net"])         # {'conv1.weight': tensor, ...} from a pickled nn.Module
    kwargs = stub_state(obj["ema"])["_init_kwargs"]   # an EDM persistent object's constructor arguments

Needs only torch and numpy: copy the file into another project as it is.
"""
import codecs
import collections
import io
import pickle
import struct
import zipfile

import numpy as np
import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
STORAGE_DTYPES = {f"{n}Storage": d for n, d in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool)]}


class Stub:
    """An inert stand-in for any class or object a pickle names: it records how it was built
    (`_stub_args`) and the state given to it (`_stub_state`). Calling it builds another Stub."""
    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._stub_args, obj._stub_kwargs, obj._stub_state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._stub_state = state

    def __repr__(self):
        return f"<stub {self._stub_name}>"


def _stub_class(module, name):
    return type(name, (Stub,), {"_stub_name": f"{module}.{name}", "__module__": "safe_pickle.stubs"})


class _Storage:
    """A storage read from the file: raw bytes and the element dtype."""

    def __init__(self, untyped, dtype):
        self.untyped, self.dtype = untyped, dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor's storage is {type(storage).__name__}, not file data")
    t = torch.empty(0, dtype=storage.dtype)
    return t.set_(storage.untyped, offset, torch.Size(size), stride)


def _rebuild_parameter(data, requires_grad, *_):
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar with a non-numeric dtype")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(name, align=False, copy=True):
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {name!r} holds Python objects")
    return dtype


def _encode(s, encoding="latin1"):
    if not isinstance(s, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed for latin1 strings only")
    return codecs.encode(s, encoding)


def _size(*args):
    return torch.Size(*args)


def _load_from_bytes(blob):
    return load(io.BytesIO(blob), strict=True)  # EDM: each tensor's storage is a nested legacy torch.save


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar, ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _encode,
}


class _Unpickler(pickle.Unpickler):
    """Allowed constructors from ALLOWED, storage types as dtypes, everything else a Stub class."""

    def __init__(self, file, storage_loader, strict=False):
        super().__init__(file, encoding="latin1")  # Python 2 pickles (legacy .t7) hold byte strings
        self._storages, self._strict = storage_loader, strict

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if self._strict:
            raise pickle.UnpicklingError(f"the file names {module}.{name}, which is not plain data")
        return _stub_class(module, name)

    def persistent_load(self, pid):
        return self._storages(pid)


def _dtype_of(storage_type):
    if isinstance(storage_type, torch.dtype):
        return storage_type
    raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")


def _load_zip(zf, strict):
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
        raise pickle.UnpicklingError("a zip file without data.pkl is not a torch checkpoint")
    root = pkl[0][:-len("data.pkl")]  # the inner folder is named after the saved file: do not rely on it
    if root + "byteorder" in names and zf.read(root + "byteorder") != b"little":
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    cache = {}

    def storage(pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        if key not in cache:
            dtype = _dtype_of(storage_type)
            blob = zf.read(f"{root}data/{key}")
            cache[key] = _Storage(torch.UntypedStorage.from_buffer(blob, dtype=torch.uint8) if blob
                                  else torch.UntypedStorage(0), dtype)
        return cache[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), storage, strict).load()


def _load_legacy(f, strict):
    """torch.save's pre-1.6 layout: magic, protocol, sys info, the object pickle, the storage keys,
    then each storage's bytes (an int64 element count, then the elements)."""
    for _ in range(3):  # magic number, protocol version, sys info: plain data
        _Unpickler(f, lambda pid: None).load()
    storages = {}

    def storage(pid):
        kind = pid[0]
        if kind == "module":  # ('module', class, source file, source): the class only
            return pid[1]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        storage_type, key, _location, numel, view = pid[1:6] if len(pid) > 5 else (*pid[1:5], None)
        if key not in storages:
            dtype = _dtype_of(storage_type)
            storages[key] = _Storage(torch.UntypedStorage(numel * torch.empty(0, dtype=dtype).element_size()), dtype)
        if view is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
        return storages[key]

    obj = _Unpickler(f, storage, strict).load()
    keys = _Unpickler(f, lambda pid: None).load()
    for key in keys:
        s = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * torch.empty(0, dtype=s.dtype).element_size()
        blob = f.read(nbytes)
        if len(blob) != nbytes or nbytes != s.untyped.nbytes():
            raise pickle.UnpicklingError("the file ends inside a tensor's data (truncated?)")
        if nbytes:
            s.untyped.copy_(torch.UntypedStorage.from_buffer(blob, dtype=torch.uint8))
    return obj


def load(file, strict=False):
    """The object in `file` (a path or a binary file object): torch's zip or legacy format or a plain
    pickle, with no code from the file run. strict=True refuses any global outside the allow-list
    (plain data only: tensors, containers, numpy scalars) instead of stubbing it.
    Raises pickle.UnpicklingError (or EOFError) on a bad file."""
    if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__"):
        with open(file, "rb") as f:
            return load(io.BytesIO(f.read()), strict)
    if zipfile.is_zipfile(file):
        file.seek(0)
        with zipfile.ZipFile(file) as zf:
            return _load_zip(zf, strict)
    file.seek(0)
    start = file.tell()
    try:
        magic = _Unpickler(file, lambda pid: None).load()
    except Exception:
        magic = None
    file.seek(start)
    if isinstance(magic, int) and magic == LEGACY_MAGIC:
        return _load_legacy(file, strict)

    def no_storage(pid):
        raise pickle.UnpicklingError("a persistent id outside a torch checkpoint")
    return _Unpickler(file, no_storage, strict).load()


# ---------------------------------------------------------------- reading what the stubs recorded

def stub_state(obj):
    """The state a Stub was given (its __dict__ as pickled). EDM's persistent objects are built by
    `_reconstruct_persistent_obj(meta)` and carry theirs in meta['state']."""
    if not isinstance(obj, Stub):
        raise ValueError(f"expected a pickled object, got {type(obj).__name__}")
    if obj._stub_name.endswith("_reconstruct_persistent_obj") and obj._stub_args:
        return obj._stub_args[0]["state"]
    state = obj._stub_state
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
        state = state[0]
    if not isinstance(state, dict):
        raise ValueError(f"{obj._stub_name} carries no attribute dict")
    return state


def stub_name(obj):
    """'module.Class' of a pickled object (for EDM persistent objects, the class_name in meta)."""
    if obj._stub_name.endswith("_reconstruct_persistent_obj") and obj._stub_args:
        meta = obj._stub_args[0]
        return meta.get("class_name", obj._stub_name)
    return obj._stub_name


def module_state_dict(obj, prefix=""):
    """The state dict a pickled nn.Module would give: parameters and persistent buffers of it and
    its submodules, walked through `_parameters`, `_buffers` and `_modules` only (attributes that
    newer torch versions add are ignored)."""
    state = stub_state(obj)
    out = collections.OrderedDict()
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is not None and name not in skip:
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
                out[prefix + name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out
