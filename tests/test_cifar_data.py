"""Tests of `abkd.cifar.data` on stand-in files in the exact `cifar-100-python` format, loaded through torchvision's
own CIFAR100 code: shapes, dtypes, labels, normalization, augmentation on train only, the validation split, the errors
for missing and corrupted files, the synthetic builder (idempotent, atomic) and its learnability."""
import os
import pickle
import shutil
import time
from urllib.error import URLError

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
import torchvision
from PIL import Image

from abkd.cifar import data as D
from abkd.training import DataNotFoundError

MEAN = torch.tensor(D.CIFAR100_MEAN)[:, None, None]
STD = torch.tensor(D.CIFAR100_STD)[:, None, None]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    "A stand-in with 3 train and 1 test image per class."
    root = tmp_path_factory.mktemp("standin")
    D.write_cifar100_standin(root, n_train=300, n_test=100, seed=0)
    return root


def copy_of(standin, tmp_path):
    shutil.copytree(standin, tmp_path / "root")
    return tmp_path / "root"


def raw(path, encoding="bytes"):
    with open(path, "rb") as f:
        return pickle.load(f, encoding=encoding)


# ---------------------------------------------------------------- on-disk format
def test_standin_on_disk_format(standin):
    folder = standin / "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == ["abkd_standin.json", "meta", "test", "train"]
    for name, n, label in (("train", 300, b"training batch 1 of 1"), ("test", 100, b"testing batch 1 of 1")):
        entry = raw(folder / name)                                        # the CIFAR page's reader: bytes keys
        assert set(entry) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (n, 3072)
        assert entry[b"batch_label"] == label and len(entry[b"filenames"]) == n
        assert all(isinstance(f, bytes) for f in entry[b"filenames"])
        assert np.bincount(entry[b"fine_labels"]).tolist() == [n // 100] * 100
        assert entry[b"coarse_labels"] == [D.FINE_TO_COARSE[c] for c in entry[b"fine_labels"]]
        assert set(raw(folder / name, "latin1")) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    meta = raw(folder / "meta")
    assert set(meta) == {b"fine_label_names", b"coarse_label_names"}
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20
    assert raw(folder / "meta", "latin1")["fine_label_names"][:2] == ["apple", "aquarium_fish"]
    with open(folder / "train", "rb") as f:
        assert f.read(2) == b"\x80\x02"                                   # protocol 2


# ---------------------------------------------------------------- loading through torchvision
def test_split_through_torchvision(standin):
    ds = D.cifar100_split(standin, train=False)
    assert isinstance(ds, torchvision.datasets.CIFAR100) and type(ds) is D.StandinCIFAR100
    assert ds.data.shape == (100, 32, 32, 3) and ds.data.dtype == np.uint8
    assert ds.classes == D.FINE_LABEL_NAMES and min(ds.targets) >= 0 and max(ds.targets) < 100
    flat = raw(standin / "cifar-100-python" / "test")[b"data"]
    assert np.array_equal(ds.data.transpose(0, 3, 1, 2).reshape(100, 3072), flat)   # R, G, B planes, row-major


def test_datasets_shapes_normalization_augmentation(standin):
    train, val, test = D.cifar100_datasets(standin)
    assert val is None and len(train) == 300 and len(test) == 100
    x, y = test[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 100
    expected = (torch.from_numpy(test.data[3]).permute(2, 0, 1).float() / 255 - MEAN) / STD
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert torch.equal(test[3][0], test[3][0])                            # test: deterministic
    torch.manual_seed(0)
    assert any(not torch.equal(train[i][0], train[i][0]) for i in range(5))   # train: augmented
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = train.transform.transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4
    plain, _, _ = D.cifar100_datasets(standin, augment=False)
    assert torch.equal(plain[0][0], plain[0][0])


def test_validation_split(standin):
    train, val, test = D.cifar100_datasets(standin, val_fraction=0.2, seed=0)
    assert (len(train), len(val), len(test)) == (200, 100, 100)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(300))
    assert np.bincount(val.targets, minlength=100).tolist() == [1] * 100       # stratified
    again = D.cifar100_datasets(standin, val_fraction=0.2, seed=0)[1]
    assert again.indices == val.indices
    assert D.cifar100_datasets(standin, val_fraction=0.2, seed=1)[1].indices != val.indices
    torch.manual_seed(1)
    x, y = val[0]                                                         # val: the test transform, no augmentation
    base = train.dataset
    assert y == base.targets[val.indices[0]]
    torch.testing.assert_close(x, D.eval_transform()(Image.fromarray(base.data[val.indices[0]])), atol=0, rtol=0)
    assert torch.equal(val[0][0], val[0][0])
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            D.cifar100_datasets(standin, val_fraction=bad)


def test_stratified_split_counts():
    targets = [0] * 500 + [1] * 500 + [2] * 7
    tr, va = D.stratified_split(targets, 0.1, seed=3)
    assert np.bincount(np.asarray(targets)[va]).tolist() == [50, 50, 1]
    assert tr == sorted(tr) and not set(tr) & set(va)
    _, va1 = D.stratified_split([0, 0, 1, 1], 0.9)
    assert len(va1) == 2                                                  # every class keeps a training image


def test_loaders(standin):
    train_dl, val_dl, test_dl = D.cifar100_loaders(standin, batch_size=64, val_fraction=0.2, seed=0)
    assert (len(train_dl), len(val_dl), len(test_dl)) == (4, 2, 2)       # drop_last=False: 200 = 3·64 + 8
    assert not train_dl.drop_last and isinstance(train_dl.generator, torch.Generator)
    xb, yb = next(iter(test_dl))
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64

    def order():
        return torch.cat([y for _, y in D.cifar100_loaders(standin, val_fraction=0.2, seed=0)[0]])
    first = order()
    assert torch.equal(first, order()) and sorted(first.tolist()) == sorted(train_dl.dataset.targets)
    assert torch.cat([y for _, y in test_dl]).tolist() == test_dl.dataset.targets
    assert D.cifar100_loaders(standin)[1] is None


# ---------------------------------------------------------------- errors
def test_missing_folder_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.cifar100_datasets(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, D.CIFAR100NotFoundError) and isinstance(e.value, DataNotFoundError)  # the CLI's class
    assert str(tmp_path / "cifar-100-python") in msg
    assert "download=True" in msg and "build_synthetic_cifar100" in msg and "cifar-100-python" in msg


def test_missing_file_names_it(standin, tmp_path):
    root = copy_of(standin, tmp_path)
    os.remove(root / "cifar-100-python" / "test")
    with pytest.raises(D.CIFAR100NotFoundError, match="missing") as e:
        D.cifar100_split(root, train=True)
    assert str(root / "cifar-100-python" / "test") in str(e.value)


def test_root_pointing_inside_the_folder(standin):
    with pytest.raises(D.CIFAR100NotFoundError, match="try root="):
        D.cifar100_split(standin / "cifar-100-python")


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_pickle_names_the_file(standin, tmp_path, verify):
    root = copy_of(standin, tmp_path)
    path = root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(RuntimeError) as e:
        D.cifar100_datasets(root, verify=verify)
    assert isinstance(e.value, D.CIFAR100CorruptError)
    assert str(path) in str(e.value) and "delete" in str(e.value)
    assert str(root / "cifar-100-python" / "test") not in str(e.value)   # only the bad file is named
    assert ("md5" in str(e.value)) == verify and ("does not unpickle" in str(e.value)) == (not verify)


def test_real_checksums_are_checked_by_default(standin, tmp_path):
    "Without the manifest the files count as real CIFAR-100: torchvision's md5s apply, and these do not match."
    root = copy_of(standin, tmp_path)
    os.remove(root / "cifar-100-python" / "abkd_standin.json")
    with pytest.raises(D.CIFAR100CorruptError) as e:
        D.cifar100_split(root)
    msg = str(e.value)
    assert D.CIFAR100.train_list[0][1] in msg and str(root / "cifar-100-python" / "train") in msg
    assert "re-download with download=True" in msg
    assert isinstance(D.cifar100_split(root, verify=False), torchvision.datasets.CIFAR100)


def test_torchvision_error_is_wrapped(standin, tmp_path):
    "A torchvision integrity failure surfaces as CIFAR100CorruptError naming the file whose md5 differs."
    root = copy_of(standin, tmp_path)
    path = root / "cifar-100-python" / "meta"
    path.write_bytes(path.read_bytes() + b"\0")                          # unpickles, but the md5 changed
    with pytest.raises(D.CIFAR100CorruptError) as e:
        D.cifar100_split(root)
    assert str(path) in str(e.value) and "md5" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError) and "corrupted" in str(e.value.__cause__)


def test_download_failure_is_wrapped(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(D.CIFAR100NotFoundError, match="could not download") as e:
        D.cifar100_split(tmp_path, download=True)
    assert str(tmp_path) in str(e.value) and "no network" in str(e.value)


def test_download_refused_over_a_standin(standin):
    with pytest.raises(ValueError, match="stand-in"):
        D.cifar100_split(standin, download=True)


# ---------------------------------------------------------------- writers: atomic, idempotent
def test_standin_writer_never_replaces_real_data(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"real")
    with pytest.raises(FileExistsError, match="not an abkd stand-in"):
        D.write_cifar100_standin(tmp_path, overwrite=True)
    assert (tmp_path / "cifar-100-python" / "train").read_bytes() == b"real"


def test_synthetic_builder_is_idempotent(tmp_path):
    folder = D.build_synthetic_cifar100(tmp_path, n_train_per_class=2, n_test_per_class=1, seed=0)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.01)
    assert D.build_synthetic_cifar100(tmp_path, 2, 1, seed=0) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.build_synthetic_cifar100(tmp_path, 2, 1, seed=1)
    D.build_synthetic_cifar100(tmp_path, 2, 1, seed=1, overwrite=True)
    assert D.read_manifest(tmp_path)["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python"]
    train, _, test = D.cifar100_datasets(tmp_path)
    assert (len(train), len(test)) == (200, 100)


def test_synthetic_is_deterministic(tmp_path):
    a = D.build_synthetic_cifar100(tmp_path / "a", 2, 1, seed=5)
    b = D.build_synthetic_cifar100(tmp_path / "b", 2, 1, seed=5)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train", "test", "meta"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_synthetic_builder_is_atomic(tmp_path, monkeypatch, overwrite):
    if overwrite:
        D.build_synthetic_cifar100(tmp_path, 2, 1, seed=0)
        before = (tmp_path / "cifar-100-python" / "train").read_bytes()
    real_dump, calls = D.dump_py2_pickle, []

    def failing_dump(obj, path):
        calls.append(path)
        if len(calls) == 2:                    # train written, test half-written: fail
            open(path, "wb").write(b"\x80\x02partial")
            raise OSError("disk full")
        real_dump(obj, path)
    monkeypatch.setattr(D, "dump_py2_pickle", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        D.build_synthetic_cifar100(tmp_path, 2, 1, seed=1, overwrite=overwrite)
    assert len(calls) == 2
    if overwrite:                              # the previous complete set is untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python"]
        assert (tmp_path / "cifar-100-python" / "train").read_bytes() == before
        assert D.read_manifest(tmp_path)["config"]["seed"] == 0
    else:                                      # nothing at all is left behind
        assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(D, "dump_py2_pickle", real_dump)
    D.build_synthetic_cifar100(tmp_path, 2, 1, seed=1, overwrite=True)
    assert len(D.cifar100_split(tmp_path)) == 200


# ---------------------------------------------------------------- learnability
def test_synthetic_set_is_learnable(tmp_path):
    "Logistic regression on the normalized test-transform tensors: far above the 1% of chance in a second or two."
    D.build_synthetic_cifar100(tmp_path, n_train_per_class=10, n_test_per_class=4, seed=0)
    train, _, test = D.cifar100_datasets(tmp_path, augment=False)

    def tensors(ds):
        return torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1), torch.tensor(ds.targets)
    (x, y), (xt, yt) = tensors(train), tensors(test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3072, 100)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc > 0.2, acc
