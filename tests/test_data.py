import hashlib
import io
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import addt_data as data
from addt_common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_JPEG = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rand_images(rng, n, h=32, w=32):
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def zip_dir(src, dst, prefix=""):
    """Zip the tree at src, entries named prefix + relative path (in scrambled order)."""
    with zipfile.ZipFile(dst, "w") as z:
        for d, _, fs in sorted(os.walk(src), reverse=True):
            for f in sorted(fs, reverse=True):
                full = os.path.join(d, f)
                z.write(full, prefix + os.path.relpath(full, src).replace(os.sep, "/"))
    return dst


# ----------------------------------------------------------------------------------------------
# CIFAR pickles, written exactly like the official ones (bytes keys, protocol 2)

def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root, rng):
    """cifar-10-batches-py/ with 5 train batches of 3 and a test batch of 4; returns expected arrays."""
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    want = {}
    for name, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 4)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        write_pickle(os.path.join(d, name), {b"batch_label": name.encode(), b"labels": y, b"data": x,
                                             b"filenames": [b"f%d.png" % i for i in range(n)]})
        want[name] = (x.reshape(n, 3, 32, 32), y)
    write_pickle(os.path.join(d, "batches.meta"), {b"num_cases_per_batch": 3, b"num_vis": 3072,
                                                   b"label_names": [c.encode() for c in CIFAR10_NAMES]})
    train = [want[f"data_batch_{i}"] for i in range(1, 6)]
    return d, {"train": (np.concatenate([x for x, _ in train]), sum((y for _, y in train), [])),
               "test": want["test_batch"]}


def make_cifar100(root, rng):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d)
    want = {}
    for split, n in [("train", 6), ("test", 5)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        write_pickle(os.path.join(d, split), {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                                              b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                                              b"data": x})
        want[split] = (x.reshape(n, 3, 32, 32), fine)
    write_pickle(os.path.join(d, "meta"), {b"fine_label_names": [b"c%02d" % i for i in range(100)],
                                           b"coarse_label_names": [b"s%02d" % i for i in range(20)]})
    return d, want


def tar_gz(src_dir, dst, order=None):
    """The official archive: members under the folder's own name, in the given (unsorted) order."""
    base = os.path.basename(src_dir)
    with tarfile.open(dst, "w:gz") as t:
        t.add(src_dir, base, recursive=False)
        for f in order or sorted(os.listdir(src_dir)):
            t.add(os.path.join(src_dir, f), f"{base}/{f}")
    return dst


def check(s, images, labels, classes=None):
    assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64
    assert torch.equal(s.images, torch.from_numpy(np.asarray(images)))
    assert s.labels.tolist() == list(labels)
    if classes is not None:
        assert s.classes == classes


CIFAR10_TAR_ORDER = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta",
                     "data_batch_2", "data_batch_5", "data_batch_1"]  # the official archive's order


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_pickles(tmp_path, split):
    d, want = make_cifar10(tmp_path / "src", np.random.default_rng(0))
    open(os.path.join(d, "readme.html"), "w").close()
    archive = tar_gz(d, tmp_path / "cifar-10-python.tar.gz", CIFAR10_TAR_ORDER)
    for path in [d, tmp_path / "src", archive]:  # the folder, a folder holding it, the .tar.gz
        check(data.load_split(str(path), split), *want[split], CIFAR10_NAMES)  # file order, not interleaved


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_pickles(tmp_path, split):
    d, want = make_cifar100(tmp_path / "src", np.random.default_rng(1))
    archive = tar_gz(d, tmp_path / "cifar-100-python.tar.gz", ["test", "meta", "train"])
    for path in [d, tmp_path / "src", archive]:
        s = data.load_split(str(path), split)
        check(s, *want[split])
        assert len(s.classes) == 100 and s.classes[7] == "c07"


def py2_pickle(d):
    """What Python 2's cPickle (protocol 2) wrote for the official batches: str as SHORT_BINSTRING /
    BINSTRING, numpy 1's numpy.core.multiarray._reconstruct. d holds bytes, ints, lists, uint8 matrices."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    def obj(v):
        if isinstance(v, bytes):
            return s(v)
        if isinstance(v, int):
            return i(v)
        if isinstance(v, list):
            return b"](" + b"".join(map(obj, v)) + b"e"
        dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R("  # dtype('u1'), then its state:
                 + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb")  # (3, '|', None x3, -1, -1, 0)
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R("
                + i(1) + i(v.shape[0]) + i(v.shape[1]) + b"\x86" + dtype + b"\x89" + s(v.tobytes()) + b"tb")
    return b"\x80\x02}(" + b"".join(s(k) + obj(v) for k, v in d.items()) + b"u."


def test_cifar10_python2_pickles(tmp_path):
    """The official files' own encoding gets past the restricted unpickler."""
    d, want = make_cifar10(tmp_path, np.random.default_rng(12))
    x, y = want["test"]
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        py2_pickle({b"batch_label": b"testing batch 1 of 1", b"labels": y, b"data": x.reshape(len(x), -1),
                    b"filenames": [b"f%d.png" % k for k in range(len(x))]}))
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(
        py2_pickle({b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR10_NAMES],
                    b"num_vis": 3072}))
    check(data.load_split(d, "test"), x, y, CIFAR10_NAMES)


def test_download_checks_md5(tmp_path, monkeypatch):
    d, want = make_cifar10(tmp_path / "src", np.random.default_rng(2))
    archive = tar_gz(d, tmp_path / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = archive.as_uri()  # file://, never the network

    with pytest.raises(UserError, match="md5"):
        data.download(url, "0" * 32, str(tmp_path / "bad"))
    assert os.listdir(tmp_path / "bad") == []  # no partial or temp file left behind
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(UserError) as e:
        data.download(missing, md5, str(tmp_path / "bad"))
    assert missing in str(e.value) and str(tmp_path / "bad" / "nowhere.tar.gz") in str(e.value)

    # the name cifar10 means ./data/cifar10, fetched once, then read from the archive in place
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", (url, md5, "cifar-10-batches-py"))
    check(data.load_split("cifar10", "test"), *want["test"], CIFAR10_NAMES)
    assert (tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    gone = (tmp_path / "gone" / "cifar-10-python.tar.gz").as_uri()
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", (gone, md5, "cifar-10-batches-py"))
    check(data.load_split("cifar10", "train"), *want["train"])  # present: no second download
    monkeypatch.setitem(data.DOWNLOADS, "cifar100", (missing, md5, "cifar-100-python"))
    with pytest.raises(UserError) as e:
        data.load_split("cifar100", "test")
    assert missing in str(e.value) and str(tmp_path / "data" / "cifar100" / "nowhere.tar.gz") in str(e.value)


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet

def save(path, arr, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def decoded(path):
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)


def make_tinyimagenet(root, rng):
    d = os.path.join(root, "tiny-imagenet-200")
    wnids = ["n03", "n01", "n02"]  # wnids.txt order, not sorted, defines the labels
    os.makedirs(d)
    with open(os.path.join(d, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    train = []
    for y, w in enumerate(wnids):
        for i in [2, 0, 1]:
            p = os.path.join(d, "train", w, "images", f"{w}_{i}.JPEG")
            save(p, rand_images(rng, 1, 64, 64)[0], "JPEG")
            train.append((i, y, p))
        with open(os.path.join(d, "train", w, f"{w}_boxes.txt"), "w") as f:
            f.write("ignored\n")
    train.sort()  # class-interleaved: the i-th file of every class (wnids.txt order) in turn
    val, lines = [], []
    for i, w in enumerate(["n02", "n03", "n01", "n02"]):
        p = os.path.join(d, "val", "images", f"val_{i}.JPEG")
        img = rand_images(rng, 1, 64, 64)[0]
        save(p, img[:, :, 0] if i == 1 else img, "JPEG")  # one greyscale image, as in the real set
        val.append((wnids.index(w), p))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    with open(os.path.join(d, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return d, wnids, {"train": ([decoded(p) for *_, p in train], [y for _, y, _ in train]),
                      "test": ([decoded(p) for _, p in val], [y for y, _ in val])}


@pytest.mark.parametrize("split", ["train", "test"])
def test_tinyimagenet(tmp_path, split):
    d, wnids, want = make_tinyimagenet(tmp_path / "src", np.random.default_rng(3))
    archive = zip_dir(tmp_path / "src", tmp_path / "tiny-imagenet-200.zip")
    for path in [d, tmp_path / "src", archive]:
        s = data.load_split(str(path), split)
        assert s.images.shape[1:] == (3, 64, 64)
        check(s, want[split][0], want[split][1], wnids)


# ----------------------------------------------------------------------------------------------
# image folders

def make_folder(root, rng):
    """ROOT/{train,test}/<class>/ of PNGs written in scrambled order, plus files to ignore."""
    want = {}
    for split, per_class in [("train", 3), ("test", 2)]:
        items = []
        for c in ["cat", "ant", "bee"]:
            for i in reversed(range(per_class)):
                img = rand_images(rng, 1, 8, 12)[0]
                ext = ".PNG" if i == 0 else ".png"  # extensions are case-insensitive
                save(os.path.join(root, split, c, f"{c}{i}{ext}"), img, "PNG")
                items.append((i, c, img.transpose(2, 0, 1)))
            open(os.path.join(root, split, c, "notes.txt"), "w").close()
        items.sort(key=lambda t: t[:2])  # class-interleaved: ant0 bee0 cat0 ant1 ...
        want[split] = ([x for *_, x in items], [["ant", "bee", "cat"].index(c) for _, c, _ in items])
    return want


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder(tmp_path, split):
    want = make_folder(tmp_path / "ROOT", np.random.default_rng(4))
    with_root = zip_dir(tmp_path / "ROOT", tmp_path / "with_root.zip", prefix="ROOT/")
    bare = zip_dir(tmp_path / "ROOT", tmp_path / "bare.zip")
    for path in [tmp_path / "ROOT", with_root, bare]:
        s = data.load_split(str(path), split)
        assert s.images.shape[1:] == (3, 8, 12)
        check(s, *want[split], ["ant", "bee", "cat"])  # PNGs exactly, class-interleaved


def test_image_folder_unequal_classes_interleave(tmp_path):
    rng = np.random.default_rng(6)
    files = {"moth": ["b.png", "a.png", "c.png", "d.png"], "ant": ["z.png"], "bee": ["y.png", "x.jpg"]}
    imgs = {}
    for c, names in files.items():
        for f in names:
            imgs[c, f] = rand_images(rng, 1, 5, 7)[0]
            save(str(tmp_path / "ROOT" / "test" / c / f), imgs[c, f], "PNG")  # PNG bytes even as .jpg
    # round-robin over ant, bee, moth by file name; classes that run out drop out
    order = [("ant", "z.png"), ("bee", "x.jpg"), ("moth", "a.png"),
             ("bee", "y.png"), ("moth", "b.png"),
             ("moth", "c.png"),
             ("moth", "d.png")]
    want = [imgs[k].transpose(2, 0, 1) for k in order], [["ant", "bee", "moth"].index(c) for c, _ in order]
    for path in [tmp_path / "ROOT", zip_dir(tmp_path / "ROOT", tmp_path / "root.zip")]:
        check(data.load_split(str(path), "test"), *want, ["ant", "bee", "moth"])


def test_folder_of_split_zips(tmp_path):
    want = make_folder(tmp_path / "ROOT", np.random.default_rng(5))
    os.makedirs(tmp_path / "zips")
    zip_dir(tmp_path / "ROOT" / "test", tmp_path / "zips" / "test.zip", prefix="test/")
    check(data.load_split(str(tmp_path / "zips" / "test.zip"), "test"), *want["test"])
    check(data.load_split(str(tmp_path / "zips"), "test"), *want["test"])
    with pytest.raises(UserError, match="'train'"):  # test.zip only
        data.load_split(str(tmp_path / "zips"), "train")


def test_mixed_sizes_rejected(tmp_path):
    save(str(tmp_path / "test" / "a" / "0.png"), np.zeros((8, 8, 3), np.uint8), "PNG")
    save(str(tmp_path / "test" / "a" / "1.png"), np.zeros((9, 8, 3), np.uint8), "PNG")
    with pytest.raises(UserError, match="one size"):
        data.load_split(str(tmp_path), "test")


# ----------------------------------------------------------------------------------------------
# the real CIFAR-10 JPEG test set

@pytest.fixture(scope="module")
def cifar_jpeg_test():
    path = os.path.join(CIFAR_JPEG, "test.zip")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: the shared data must lie beside the repository (../shared)")
    return path


def test_real_cifar10_jpeg(cifar_jpeg_test):
    """The one test that reads all of test.zip (~4 s): class-interleaved, so the first 1024 are balanced."""
    with zipfile.ZipFile(cifar_jpeg_test) as z:
        second = {n: z.read(f"test/{n}/0001.jpg") for n in ("airplane", "truck")}
    jpeg = lambda b: torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB")).transpose(2, 0, 1))
    s = data.load_split(cifar_jpeg_test, "test")
    assert s.images.shape == (10000, 3, 32, 32) and s.images.dtype == torch.uint8
    assert s.classes == CIFAR10_NAMES
    assert s.labels[:20].tolist() == list(range(10)) * 2
    assert torch.equal(s.images[10], jpeg(second["airplane"])) and torch.equal(s.images[19], jpeg(second["truck"]))
    assert s.labels[:1024].bincount().tolist() == [103] * 4 + [102] * 6
    assert torch.equal(s.labels.bincount(), torch.full((10,), 1000))


# ----------------------------------------------------------------------------------------------
# errors

def test_errors_name_the_path_and_layouts(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="accepted layouts") as e:
        data.load_split(missing, "test")
    assert missing in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="accepted layouts") as e:
        data.load_split(str(empty), "test")
    assert str(empty) in str(e.value)
    save(str(tmp_path / "only_train" / "train" / "a" / "0.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    with pytest.raises(UserError, match="'test'.*accepted layouts") as e:
        data.load_split(str(tmp_path / "only_train"), "test")
    assert str(tmp_path / "only_train") in str(e.value)
    with pytest.raises(UserError, match="split"):
        data.load_split(str(tmp_path / "only_train"), "val")
    (tmp_path / "junk.bin").write_bytes(b"not an archive")
    with pytest.raises(UserError, match="accepted layouts"):
        data.load_split(str(tmp_path / "junk.bin"), "test")


@pytest.mark.parametrize("zipped", [False, True])
def test_unreadable_image_names_the_file(tmp_path, zipped):
    good = io.BytesIO()
    Image.fromarray(rand_images(np.random.default_rng(7), 1)[0]).save(good, format="PNG")
    for case, blob in [("garbage", b"not an image"), ("cut", good.getvalue()[:200])]:
        root = tmp_path / case
        save(str(root / "test" / "a" / "0.png"), rand_images(np.random.default_rng(8), 1)[0], "PNG")
        (root / "test" / "b").mkdir()
        (root / "test" / "b" / f"{case}.png").write_bytes(blob)
        path = zip_dir(root, tmp_path / f"{case}.zip") if zipped else root
        with pytest.raises(UserError, match="is not a readable image") as e:
            data.load_split(str(path), "test")
        assert f"{path}: test/b/{case}.png is not" in str(e.value) and "\n" not in str(e.value)


def test_damaged_archives_name_the_file(tmp_path):
    d, _ = make_cifar10(tmp_path / "src", np.random.default_rng(9))
    tgz = tar_gz(d, tmp_path / "whole.tar.gz").read_bytes()
    zipped = zip_dir(d, tmp_path / "whole.zip", prefix="cifar-10-batches-py/").read_bytes()
    i = zipped.index(b"test_batch") + 200  # inside the first member's data: its CRC no longer matches
    cases = {"cut.tar.gz": tgz[:len(tgz) // 2], "empty.tar.gz": b"", "cut.zip": zipped[:len(zipped) // 2],
             "empty.zip": b"", "crc.zip": zipped[:i] + bytes([zipped[i] ^ 1]) + zipped[i + 1:]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UserError, match="truncated or corrupt .*; download it again") as e:
            data.load_split(str(tmp_path / name), "test")
        assert str(e.value).startswith(f"{tmp_path / name} is truncated")


def test_damaged_cifar_batch_names_it(tmp_path):
    d, _ = make_cifar10(tmp_path / "src", np.random.default_rng(10))
    batch = os.path.join(d, "test_batch")
    whole = open(batch, "rb").read()
    for blob in [whole[:len(whole) // 2], b"not a pickle", pickle.dumps([1, 2], protocol=2)]:
        open(batch, "wb").write(blob)
        with pytest.raises(UserError, match="not a (readable )?CIFAR pickle") as e:
            data.load_split(d, "test")
        assert str(e.value).startswith(f"{d}: test_batch is not")


class RunsShell:
    """A pickle payload: unpickling it calls os.system."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_cifar_pickle_cannot_run_code(tmp_path):
    d, _ = make_cifar10(tmp_path / "src", np.random.default_rng(11))
    marker = tmp_path / "ran"
    evil = {b"batch_label": b"x", b"labels": [0], b"data": RunsShell(f"touch {marker}")}
    write_pickle(os.path.join(d, "test_batch"), evil)
    archive = tar_gz(d, tmp_path / "cifar-10-python.tar.gz")
    for path in [d, archive]:
        with pytest.raises(UserError, match=r"test_batch is not a readable CIFAR pickle .*refused .*system"):
            data.load_split(str(path), "test")
    assert not marker.exists()
    pickle.loads(open(os.path.join(d, "test_batch"), "rb").read())  # the payload is real: plain pickle runs it
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# batching helpers

def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.equal(data.to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    assert data.to_float(x).dtype == torch.float32


def test_random_crop_flip():
    x = torch.randint(0, 256, (64, 3, 7, 9), dtype=torch.uint8)
    out = lambda **kw: data.random_crop_flip(x, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out(), out())  # reproducible
    assert torch.equal(data.random_crop_flip(x, pad=0, flip=False), x)

    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    y = out(pad=4, flip=False)
    assert y.shape == x.shape and y.dtype == x.dtype
    offsets = []
    for i in range(len(x)):  # each output is one of the (2*4+1)^2 shifted crops
        found = [(a, b) for a in range(9) for b in range(9) if torch.equal(y[i], xp[i, :, a:a + 7, b:b + 9])]
        assert found
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # offsets really vary per sample

    f = out(pad=0)  # flip only
    flipped = [torch.equal(f[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(flipped[i] or torch.equal(f[i], x[i]) for i in range(len(x)))
    assert 10 < sum(flipped) < 54

    z = out(pad=4).float()  # float input, crop and flip together
    assert torch.equal(data.random_crop_flip(x.float(), generator=torch.Generator().manual_seed(0)), z)
    assert all(any(torch.equal(z[i], c[i, :, a:a + 7, b:b + 9].float()) for c in (xp, xp.flip(-1))
                   for a in range(9) for b in range(9)) for i in range(len(x)))


def test_epoch_indices():
    n = 103
    a = data.epoch_indices(n, epoch=3, seed=7)
    assert a.dtype == torch.int64 and sorted(a.tolist()) == list(range(n))
    assert torch.equal(a, data.epoch_indices(n, epoch=3, seed=7))
    assert not torch.equal(a, data.epoch_indices(n, epoch=4, seed=7))
    assert not torch.equal(a, data.epoch_indices(n, epoch=3, seed=8))
    assert torch.equal(data.epoch_indices(n, 3, 7, shuffle=False), torch.arange(n))

    parts = [data.epoch_indices(n, 3, 7, rank=r, world=4) for r in range(4)]
    assert {len(p) for p in parts} == {n // 4}
    flat = torch.cat(parts).tolist()
    assert len(set(flat)) == len(flat) == n - n % 4
    assert set(flat) <= set(range(n))


@pytest.mark.parametrize("n,world", [(1024, 1), (1024, 3), (10, 4), (2, 5)])
def test_shard(n, world):
    ranges = [data.shard(n, r, world) for r in range(world)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
