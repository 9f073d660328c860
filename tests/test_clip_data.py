"""Tests of `abkd.clip.data`: base/new halves, class subsampling, few-shot sampling, every reader on its stand-in, and
the errors for missing or corrupt files."""
import json, math
from pathlib import Path
import pytest
import abkd.clip.data as D
from abkd.training import DataNotFoundError
from abkd.clip.data import (DATASETS, STANDIN_WORDS, Datum, DatasetNotFoundError, ImageList, base_new_labels,
                            base_new_splits, clip_transform, fewshot, read_dataset, subsample_classes,
                            write_standin_dataset)


@pytest.mark.parametrize("n, base", [(1, [0]), (2, [0]), (5, [0, 1, 2]), (10, [0, 1, 2, 3, 4]), (101, list(range(51)))])
def test_base_new_halves(n, base):
    b, nw = base_new_labels(list(range(n)) * 2)
    assert b == base and nw == list(range(len(base), n))
    assert len(b) == math.ceil(n / 2)


def test_subsample_relabels_in_order_and_uses_training_labels():
    items = [Datum(f"{i}", y, f"c{y}") for i, y in enumerate([4, 0, 2, 6, 4, 8])]
    new = subsample_classes(items, "new")                  # labels {0,2,4,6,8}: base 0,2,4; new 6,8
    assert [(d.label, d.classname) for d in new] == [(0, "c6"), (1, "c8")]
    # test split lacking a class: the halves follow the training labels passed in
    test = [Datum("t", 6, "c6")]
    assert subsample_classes(test, "base", labels=[0, 2, 4, 6, 8]) == []
    assert subsample_classes(test, "new", labels=[0, 2, 4, 6, 8])[0].label == 0


def test_fewshot_is_seeded_and_per_label():
    items = [Datum(str(i), i % 3, f"c{i % 3}") for i in range(30)]
    a, b = fewshot(items, 4, seed=3), fewshot(items, 4, seed=3)
    assert a == b and len(a) == 12 and all(sum(d.label == y for d in a) == 4 for y in range(3))
    assert fewshot(items, 4, seed=4) != a
    assert fewshot(items, 0, seed=1) == items


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_reader_on_its_standin(tmp_path, name):
    write_standin_dataset(tmp_path, name, n_classes=5, n_train=3, n_val=1, n_test=2, image_size=16, seed=1)
    splits = read_dataset(tmp_path, name)
    assert len(splits["train"]) == 15 and len(splits["test"]) == 10
    assert {d.classname for d in splits["train"]} == set(STANDIN_WORDS[:5])
    s = base_new_splits(tmp_path, name, num_shots=2)
    assert s.classnames == STANDIN_WORDS[:5] and s.n_base == 3
    assert len(s.train_base) == 6 and {d.label for d in s.test_new} == {0, 1}
    x, y = ImageList(s.test_new, clip_transform(16))[0]
    assert x.shape == (3, 16, 16) and y == 0


def test_zhou_split_file_format(tmp_path):
    write_standin_dataset(tmp_path, "oxford_pets", n_classes=2, n_train=1, n_val=1, n_test=1, image_size=8)
    raw = json.loads((tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    assert set(raw) == {"train", "val", "test"}
    impath, label, cname = raw["train"][0]
    assert isinstance(impath, str) and isinstance(label, int) and cname == STANDIN_WORDS[0]
    assert (tmp_path / "oxford_pets" / "images" / impath).is_file()


def test_missing_split_file_names_it(tmp_path):
    write_standin_dataset(tmp_path, "ucf101", n_classes=2, n_train=1, n_val=1, n_test=1, image_size=8)
    (tmp_path / "ucf101" / "split_zhou_UCF101.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="split file .*split_zhou_UCF101.json"):
        read_dataset(tmp_path, "ucf101")
    with pytest.raises(DatasetNotFoundError, match="dataset folder") as e:
        read_dataset(tmp_path, "sun397")
    assert isinstance(e.value, DataNotFoundError)                          # the class the command line reports
    assert str(tmp_path / "sun397") in str(e.value) and D.COOP_DATASETS in str(e.value)


def test_corrupt_split_and_image(tmp_path):
    write_standin_dataset(tmp_path, "dtd", n_classes=2, n_train=2, n_val=1, n_test=1, image_size=8)
    split = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_dataset(tmp_path, "dtd")
    write_standin_dataset(tmp_path, "dtd", n_classes=2, n_train=2, n_val=1, n_test=1, image_size=8)
    item = read_dataset(tmp_path, "dtd")["train"][0]
    Path(item.impath).write_bytes(b"not an image")
    with pytest.raises(ValueError, match="corrupt"):
        ImageList([item], clip_transform(8))[0]


def test_standin_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = D._standin_image
    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3: raise RuntimeError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(D, "_standin_image", failing)
    with pytest.raises(RuntimeError):
        write_standin_dataset(tmp_path, "food101", n_classes=2, n_train=2, image_size=8)
    assert not any(tmp_path.iterdir())

