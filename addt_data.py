"""Image data sets held in memory as uint8 tensors, and device-side batching helpers.

load_split(path, split) reads, from a directory or straight from the archive:
  - CIFAR-10/100 python pickles: cifar-10-batches-py/ or cifar-100-python/ (or a directory holding
    one), or the official .tar.gz; the names cifar10 / cifar100 mean ./data/<name>, downloaded if absent
  - Tiny-ImageNet: tiny-imagenet-200/ or its .zip ('test' = the labelled val split); name tinyimagenet
  - an image folder ROOT/{train,test}/<class>/*.{png,jpg,jpeg}, a .zip of it, or a directory of <split>.zip

Order. Pickles keep file order (the paper's protocol: the first 1024 test images in file order).
Image folders are class-interleaved: the k-th file (by name) of every class (by name) in turn, classes
that run out dropped, so the first n images of a split are class-balanced (the first 1024 of the
CIFAR-10 JPEG test set are ~102 per class, not 1000 airplanes and 24 automobiles). Tiny-ImageNet train
is laid out like an image folder and is interleaved the same way (wnids.txt order of classes); its
'test' keeps the listed order of val_annotations.txt, which is already mixed.

Damaged input (a truncated archive, an unreadable image, a CIFAR batch that is not a pickle) is a
UserError naming the file. CIFAR pickles are read by an unpickler that builds only dicts, lists,
strings, numbers and numpy arrays, so a crafted file cannot run code.
"""
import hashlib
import io
import os
import pickle
import tarfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from addt_common import UserError

try:  # numpy >= 2; the official pickles name numpy.core.multiarray, which both map here
    from numpy._core.multiarray import _reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct

LAYOUTS = ("accepted layouts: CIFAR-10/100 python pickles (cifar-10-batches-py/ or cifar-100-python/, "
           "a directory holding one, or the official .tar.gz); Tiny-ImageNet (tiny-imagenet-200/ or its .zip); "
           "an image folder ROOT/{train,test}/<class>/*.png|jpg|jpeg, a .zip of it, or a directory holding "
           "<split>.zip; the names cifar10, cifar100, tinyimagenet (./data/<name>, downloaded when absent)")

# name -> (official url, md5, what the archive unpacks to)
DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "tinyimagenet": ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                     "90528d7ca1a48142e341f4ef8d21d0de", "tiny-imagenet-200"),
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
ARCHIVE_EXTS = (".zip", ".tar", ".tar.gz", ".tgz")
# what a damaged .zip or .tar.gz raises while being read
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


class ImageSet(NamedTuple):
    images: torch.Tensor  # uint8, N x 3 x H x W, CPU
    labels: torch.Tensor  # int64, N
    classes: list         # class names, index = label


# ----------------------------------------------------------------------------------------------
# files of a directory, .zip or .tar(.gz), read in place

class _Tree:
    def __init__(self, path):
        self.path, self.zip, self.tar, self.files = path, None, None, None  # files None: a directory
        if os.path.isdir(path):
            return
        if zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            self.files = {n for n in self.zip.namelist() if not n.endswith("/")}
        elif tarfile.is_tarfile(path):
            try:  # listing a .tar.gz decompresses all of it: a truncated download fails here
                self.tar = tarfile.open(path)
                self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}
            except ARCHIVE_ERRORS as e:
                raise _damaged(path, e) from None
            self.files = set(self.members)
        elif path.lower().endswith(ARCHIVE_EXTS):  # an empty or cut-off download has no readable header
            raise _damaged(path, "no archive header or directory found")
        else:
            raise UserError(f"{path} is not a directory, .zip or .tar.gz; {LAYOUTS}")

    def isfile(self, name):
        return os.path.isfile(os.path.join(self.path, name)) if self.files is None else name in self.files

    def isdir(self, name):
        if self.files is None:
            return os.path.isdir(os.path.join(self.path, name))
        return any(n.startswith(name + "/") for n in self.files)

    def topdirs(self):
        if self.files is None:
            return sorted(e.name for e in os.scandir(self.path) if e.is_dir())
        return sorted({n.split("/")[0] for n in self.files if "/" in n})

    def walk(self, top):
        """Names of all files under top/ (any order)."""
        if self.files is not None:
            return [n for n in self.files if n.startswith(top + "/")]
        root = os.path.join(self.path, top)
        return [f"{top}/{os.path.relpath(os.path.join(d, f), root).replace(os.sep, '/')}"
                for d, _, fs in os.walk(root) for f in fs]

    def read_many(self, names):
        """The bytes of each name, in the order given."""
        if missing := [n for n in names if not self.isfile(n)]:
            raise UserError(f"{self.path}: {missing[0]} is missing")
        try:
            if self.tar is not None:  # a .tar.gz only streams forwards: read members in archive order
                order = sorted(names, key=lambda n: self.members[n].offset_data)
                got = {n: self.tar.extractfile(self.members[n]).read() for n in order}
                return [got[n] for n in names]
            if self.zip is not None:  # read on one thread: ZipFile's reference counting is not thread-safe
                return [self.zip.read(n) for n in names]
        except ARCHIVE_ERRORS as e:
            raise _damaged(self.path, e) from None
        out = []
        for n in names:
            with open(os.path.join(self.path, n), "rb") as f:
                out.append(f.read())
        return out


def _damaged(path, why):
    return UserError(f"{path} is truncated or corrupt ({why}); download it again")


def _image(tree, name, blob):
    """One image file as an H x W x 3 uint8 array."""
    try:
        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    except UnidentifiedImageError:  # its own message names only an anonymous BytesIO
        why = "no known image format"
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises on truncated or damaged data
        why = str(e)
    raise UserError(f"{tree.path}: {name} is not a readable image ({why})")


def _decode(tree, names):
    """Decode image files into one uint8 N x 3 x H x W array; PIL's decoders release the GIL, so threads overlap."""
    blobs = tree.read_many(names)
    first = _image(tree, names[0], blobs[0])
    out = np.empty((len(names), 3, *first.shape[:2]), np.uint8)

    def some(start):  # chunks of 256: one future per image would cost more than a small decode
        for i in range(start, min(start + 256, len(names))):
            a = _image(tree, names[i], blobs[i])
            if a.shape != first.shape:
                raise UserError(f"{tree.path}: {names[i]} is {a.shape[1]}x{a.shape[0]}, but {names[0]} is "
                                f"{first.shape[1]}x{first.shape[0]}; all images of a split must have one size")
            out[i] = a.transpose(2, 0, 1)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(some, range(0, len(names), 256)))
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# one reader per layout: an ImageSet, or None when the layout is not at prefix p

def _latin1(s, encoding):
    """Python 3 pickles bytes at protocol 2 as _codecs.encode(str, 'latin1'): allow exactly that call."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode(..., {encoding!r})")
    return s.encode("latin1")


# Every global a CIFAR batch needs. The official files are Python 2 pickles of dicts holding lists,
# strings and numpy arrays: numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype. numpy 2
# writes numpy._core; Python 3 writes bytes through _codecs.encode and, for b"", builtins.bytes.
PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Calls nothing outside PICKLE_GLOBALS: a crafted pickle's os.system (or any other callable) is refused."""

    def find_class(self, module, name):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return PICKLE_GLOBALS[module, name]


def _unpickle(tree, name, blob, keys):
    """The dict pickled in member `name`, which must hold `keys`."""
    try:  # encoding="bytes": the official files were pickled by Python 2
        d = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # garbage or cut-off bytes can raise nearly any type; all mean a bad file
        raise UserError(f"{tree.path}: {name} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise UserError(f"{tree.path}: {name} is not a CIFAR pickle (no dict with keys {[k.decode() for k in keys]})")
    return d


def _cifar(tree, p, split):
    if tree.isfile(p + "batches.meta"):  # CIFAR-10
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", b"labels", b"label_names"
    elif tree.isfile(p + "meta") and tree.isfile(p + "train"):  # CIFAR-100, fine labels
        files, meta, label_key, names_key = [split], "meta", b"fine_labels", b"fine_label_names"
    else:
        return None
    blobs = tree.read_many([p + f for f in [meta] + files])
    batches = [_unpickle(tree, p + f, b, (b"data", label_key)) for f, b in zip(files, blobs[1:])]
    for f, b in zip(files, batches):
        x = b[b"data"]
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape[1:] == (3072,)):
            raise UserError(f"{tree.path}: {p + f} holds no N x 3072 uint8 'data' array")
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    classes = [c.decode() for c in _unpickle(tree, p + meta, blobs[0], (names_key,))[names_key]]
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels).long(), classes)


def _tinyimagenet(tree, p, split):
    if not tree.isfile(p + "wnids.txt"):
        return None
    classes = tree.read_many([p + "wnids.txt"])[0].decode().split()
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":  # train/<wnid>/images/*.JPEG, class-interleaved like an image folder
        per_class = [[] for _ in classes]
        for w, _, f in sorted(n.split("/")[-3:] for n in tree.walk(p + "train") if n.split("/")[-2] == "images"):
            if w in index and f.lower().endswith(IMAGE_EXTS):
                per_class[index[w]].append(f)
        order = interleave(per_class)
        names = [f"{p}train/{classes[y]}/images/{f}" for y, f in order]
        labels = [y for y, _ in order]
    elif tree.isfile(p + "val/val_annotations.txt"):  # the labelled val split, in its listed order
        ann = tree.read_many([p + "val/val_annotations.txt"])[0]
        rows = [line.split("\t")[:2] for line in ann.decode().splitlines() if line.strip()]
        if unknown := sorted({w for _, w in rows if w not in index}):
            raise UserError(f"{tree.path}: {p}val/val_annotations.txt names classes that wnids.txt lacks "
                            f"({unknown[:3]})")
        names, labels = [f"{p}val/images/{f}" for f, _ in rows], [index[w] for _, w in rows]
    else:
        return None
    if not names:
        return None
    return ImageSet(_decode(tree, names), torch.tensor(labels), classes)


def interleave(per_class):
    """[(label, file)] from per_class[label] = sorted files: the k-th file of every class in turn,
    skipping classes that have run out, so any prefix is as class-balanced as the counts allow."""
    return [(y, files[k]) for k in range(max(map(len, per_class), default=0))
            for y, files in enumerate(per_class) if k < len(files)]


def _folder(tree, p, split):
    if not tree.isdir(p + split):
        return None
    by_class = {}
    for x in sorted(n[len(p + split) + 1:].split("/") for n in tree.walk(p + split)):
        if len(x) == 2 and x[1].lower().endswith(IMAGE_EXTS):
            by_class.setdefault(x[0], []).append(x[1])
    if not by_class:
        return None
    classes = list(by_class)  # sorted by name, as the files were
    order = interleave(list(by_class.values()))
    images = _decode(tree, [f"{p}{split}/{classes[y]}/{f}" for y, f in order])
    return ImageSet(images, torch.tensor([y for y, _ in order]), classes)


def _read_tree(tree, split):
    for p in [""] + [d + "/" for d in tree.topdirs()]:  # the layout itself, or one folder down
        for reader in (_cifar, _tinyimagenet, _folder):
            if (s := reader(tree, p, split)) is not None:
                return s
    return None


# ----------------------------------------------------------------------------------------------

def download(url, md5, dest_dir):
    """Fetch url into dest_dir/<its file name>, checking the md5; written to a temp file then renamed."""
    target = os.path.abspath(os.path.join(dest_dir, os.path.basename(urllib.parse.urlparse(url).path)))
    os.makedirs(dest_dir, exist_ok=True)
    tmp, h = f"{target}.{os.getpid()}.tmp", hashlib.md5()
    print(f"downloading {url} -> {target}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
    except OSError as e:  # URLError and socket timeouts are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); fetch it by hand and put it at {target}") from e
    if h.hexdigest() != md5:
        os.remove(tmp)
        raise UserError(f"{url} has md5 {h.hexdigest()}, expected {md5}; fetch it by hand and put it at {target}")
    os.replace(tmp, target)
    return target


def _named(name):
    """cifar10 / cifar100 / tinyimagenet -> ./data/<name>, downloading the archive when neither it
    nor its unpacked folder is there."""
    url, md5, unpacked = DOWNLOADS[name]
    root = os.path.join("data", name)
    archive = os.path.basename(urllib.parse.urlparse(url).path)
    if not any(os.path.exists(os.path.join(root, n)) for n in (unpacked, archive)):
        download(url, md5, root)
    return root


def load_split(path, split):
    """The whole `split` ('train' or 'test') of the data set at `path` as an ImageSet, in a stable order:
    file order for CIFAR pickles and Tiny-ImageNet 'test' (val_annotations.txt); otherwise class-interleaved,
    image i = file i // C (by name) of class i % C (classes by name; Tiny-ImageNet: wnids.txt order) while
    every class still has files, then round-robin over the classes that do (see the module docstring)."""
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', not {split!r}")
    if path in DOWNLOADS:
        path = _named(path)
    if not os.path.exists(path):
        raise UserError(f"data set not found: {path}; {LAYOUTS}")
    trees = [_Tree(path)]
    if os.path.isdir(path):  # a downloaded archive, or a folder of per-split zips
        for n in (f"{split}.zip", *(os.path.basename(u) for u, _, _ in DOWNLOADS.values())):
            if os.path.isfile(os.path.join(path, n)):
                trees.append(_Tree(os.path.join(path, n)))
    for tree in trees:
        if (s := _read_tree(tree, split)) is not None:
            check_labels(s, f"{path} ({split})")
            return s
    raise UserError(f"no '{split}' split of any known data set in {path}; {LAYOUTS}")


def check_labels(data, source):
    """Every label names one of the data set's classes (a CIFAR batch's labels come from the file)."""
    bad = (data.labels < 0) | (data.labels >= len(data.classes))
    if bad.any():
        k = int(bad.nonzero()[0])
        raise UserError(f"{source}: image {k} has label {int(data.labels[k])}, but the data set names "
                        f"{len(data.classes)} classes (labels 0..{len(data.classes) - 1}); the file is damaged or "
                        "its labels and class names do not belong together")


def check_fits(data, source, model, size=None, num_classes=None):
    """Refuse a data set a model was not made for, before any work: images of another size than `size`
    (H, W; None: any) or another number of classes than `num_classes` (None: any). model names the
    model in the message, e.g. 'classifier runs/c/classifier.pt'."""
    h, w = data.images.shape[-2:]
    if size is not None and (h, w) != tuple(size):
        raise UserError(f"{source} holds {w}x{h} images, but {model} takes {size[1]}x{size[0]} images: pass a data "
                        "set of that size, or a model made for this one")
    if num_classes is not None and len(data.classes) != num_classes:
        raise UserError(f"{model} has {num_classes} classes, {source} {len(data.classes)}: pass the classifier "
                        "trained on this data set")


# ----------------------------------------------------------------------------------------------
# batching on the device, no worker processes

def to_float(x):
    """uint8 images -> float32 in [0, 1], on x's device."""
    return x.to(torch.float32) / 255


def random_crop_flip(x, pad=4, flip=True, generator=None):
    """Per-sample random crop of the zero-padded batch and random horizontal flip, as one gather.
    pad=0 gives flip only (the diffusion fine-tuning augmentation)."""
    n, c, h, w = x.shape
    if pad == 0 and not flip:
        return x
    dev = x.device
    rows, cols = torch.arange(h, device=dev).expand(n, h), torch.arange(w, device=dev).expand(n, w)
    if flip:  # read columns right to left: flipping folded into the gather
        flipped = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
        rows = rows + torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=dev)
        cols = cols + torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=dev)
    i = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return x[i, ch, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_indices(n, epoch, seed, rank=0, world=1, shuffle=True):
    """This rank's sample order for `epoch`: a permutation seeded by (seed, epoch), so a resumed run
    replays it without saved RNG state; trimmed to a multiple of world, rank r takes every world-th."""
    idx = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    idx = idx[: n - n % world][rank::world]
    return torch.from_numpy(idx).long()


def shard(n, rank, world):
    """(start, stop): rank's contiguous share of the first n items; shares differ by at most one."""
    return rank * n // world, (rank + 1) * n // world
