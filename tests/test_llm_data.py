"""Tests of `abkd.llm.data`: the exact MiniLLM prompt templates, both record layouts and their errors, prompt-masked
tokenization and truncation, the padding collate, the validation split (the official first n lines, a seeded draw as
an option), the test-set registry and its ≥ 11-token rule, the synthetic stand-in (records, the byte-level BPE
tokenizer through AutoTokenizer, the atomic writer), and the pre-training corpus (get_openwebtext.py's layout, the
blocks of process_data_pretrain.py, its stand-in and its errors)."""
import json
import re

import pytest
import torch

from abkd.llm import data as D
from abkd.training import DataNotFoundError

NO_INPUT_LITERAL = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
WITH_INPUT_LITERAL = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                      "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class WordTokenizer:
    "A stand-in tokenizer: one token per whitespace-separated word (ids = word lengths), EOS 1, optional pad."
    def __init__(self, pad_token_id=None):
        self.eos_token_id, self.pad_token_id = 1, pad_token_id

    def encode(self, text, add_special_tokens=True):
        return [len(w) + 1 for w in text.split()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    texts = D.synthetic_texts(D.synthetic_instructions(300, seed=0))
    texts += ["Paragraph one.\n\n\nParagraph two.\n\n\n"] * 300   # runs of newlines, as in real text: a "\n\n" token
    D.train_bpe_tokenizer(texts, out, vocab_size=600)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tok_dir))


# ---------------------------------------------------------------- prompts

def test_prompt_literals():
    assert D.NO_INPUT == NO_INPUT_LITERAL
    assert D.WITH_INPUT == WITH_INPUT_LITERAL


def test_build_prompt_with_and_without_input():
    assert D.build_prompt("Name a color.") == NO_INPUT_LITERAL.replace("{instruction}", "Name a color.")
    assert D.build_prompt("Name a color.", "") == D.build_prompt("Name a color.", None) == D.build_prompt("Name a color.")
    assert D.build_prompt("Sum.", "1 2") == WITH_INPUT_LITERAL.replace("{instruction}", "Sum.").replace("{input}", "1 2")
    # MiniLLM's rule is len(input) == 0: a whitespace-only input is not stripped and selects WITH_INPUT
    assert D.build_prompt("Sum.", " ") == WITH_INPUT_LITERAL.replace("{instruction}", "Sum.").replace("{input}", " ")
    assert D.build_prompt("a {x} b", "{instruction}").count("{") == 2      # braces are plain text
    with pytest.raises(TypeError, match="instruction must be a string"):
        D.build_prompt(None)


# ---------------------------------------------------------------- records

def test_both_field_layouts():
    dolly = {"instruction": "Reverse.", "context": "a b", "response": "b a", "category": "open_qa"}
    minillm = {"instruction": "Reverse.", "input": "a b", "output": "b a"}
    a, b = D.example_from_record(dolly), D.example_from_record(minillm)
    assert a == b
    assert (a.instruction, a.input, a.output, a.references) == ("Reverse.", "a b", "b a", ["b a"])
    assert a.prompt == D.build_prompt("Reverse.", "a b")
    no_ctx = D.example_from_record({"instruction": "Hi.", "response": "Hello"})
    assert no_ctx.input == "" and no_ctx.prompt == D.build_prompt("Hi.")
    assert D.example_from_record({"instruction": "Hi.", "context": None, "response": "x"}).input == ""


def test_several_references():
    e = D.example_from_record({"instruction": "i", "input": "", "output": ["first", "second"]})
    assert (e.output, e.references) == ("first", ["first", "second"])
    e2 = D.example_from_record({"instruction": "i", "outputs": ["p", "q", "r"]})
    assert (e2.output, e2.references) == ("p", ["p", "q", "r"])
    assert D.example_from_record(e.to_record()) == e
    assert D.example_from_record({"instruction": "i", "output": "o"}).to_record()["output"] == "o"


def test_given_prompt_field():
    e = D.example_from_record({"instruction": "i", "output": "o", "prompt": "Line one<n>Line two"})
    assert e.prompt == "Line one\nLine two"


def test_jsonl_files_and_errors(tmp_path):
    p = tmp_path / "train.jsonl"
    rows = [{"instruction": "a", "context": "", "response": "x"}, {"instruction": "b", "input": "c", "output": "y"}]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    got = D.read_examples(p)
    assert [e.instruction for e in got] == ["a", "b"] and D.load_instructions(p) == got
    assert D.read_jsonl(p) == rows

    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n" + json.dumps({"instruction": "z", "input": "w"}) + "\n")
    with pytest.raises(ValueError) as err:
        D.read_examples(p)
    assert f"{p}, line 3" in str(err.value) and "missing field 'output'" in str(err.value)

    p.write_text(json.dumps({"context": "c", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing field 'instruction'"):
        D.read_examples(p)
    p.write_text(json.dumps(rows[0]) + "\n" + '{"instruction": "a",\n')
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: not valid JSON"):
        D.read_examples(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        D.read_examples(p)
    p.write_text(json.dumps({"instruction": 5, "output": "o"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: field 'instruction' must be a string"):
        D.read_examples(p)
    p.write_text(json.dumps({"instruction": "i", "output": []}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: field 'output' must be a string or a non-empty list"):
        D.read_examples(p)
    with pytest.raises(FileNotFoundError, match="no such jsonl file"):
        D.read_examples(tmp_path / "missing.jsonl")


def test_datasets_load_dataset_path(tmp_path):
    "The hub code path (datasets.load_dataset) on a local file through the json builder, rows named in errors."
    p = tmp_path / "dolly.jsonl"
    rows = [{"instruction": "a", "context": "c", "response": "x", "category": "k"},
            {"instruction": "b", "context": "", "response": "y", "category": "k"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = D.load_instructions("json", data_files=str(p), cache_dir=str(tmp_path / "cache"))
    assert got == D.read_examples(p)
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "b", "context": ""}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: missing field 'output'"):
        D.load_instructions("json", data_files=str(p), cache_dir=str(tmp_path / "cache2"))


# ---------------------------------------------------------------- tokenization

def test_label_masking(tok):
    ex = D.InstructionExample("Reverse the order of the words.", "red green blue", "blue green red")
    f = D.tokenize_example(tok, ex)
    prompt = tok.encode(ex.prompt, add_special_tokens=False)
    full = tok.encode(ex.prompt + ex.output, add_special_tokens=False) + [tok.eos_token_id]
    assert f["prefix_match"] and f["input_ids"] == full            # MiniLLM's tokenization exactly
    assert f["prompt_len"] == len(prompt) and f["input_ids"][:len(prompt)] == prompt
    assert f["labels"][:len(prompt)] == [-100] * len(prompt)
    assert f["labels"][len(prompt):] == f["input_ids"][len(prompt):]   # response and EOS supervised
    assert f["labels"][-1] == tok.eos_token_id
    assert tok.decode(f["labels"][len(prompt):-1]) == "blue green red"


def test_prefix_mismatch_falls_back_to_separate_tokens(tok):
    ex = D.InstructionExample("Say it.", "", "\n\nwords")      # "\n" + "\n\n" merges across the prompt's end
    prompt = tok.encode(ex.prompt, add_special_tokens=False)
    full = tok.encode(ex.prompt + ex.output, add_special_tokens=False)
    assert full[:len(prompt)] != prompt
    f = D.tokenize_example(tok, ex)
    assert not f["prefix_match"]
    assert f["input_ids"] == prompt + tok.encode(ex.output, add_special_tokens=False) + [tok.eos_token_id]
    assert f["labels"] == [-100] * len(prompt) + f["input_ids"][len(prompt):]
    assert tok.decode(f["input_ids"][:-1]) == ex.prompt + ex.output


def test_truncation(tok):
    ex = D.InstructionExample("apple " * 300, "", "river " * 400)
    prompt = tok.encode(ex.prompt, add_special_tokens=False)
    assert len(prompt) > 256
    f = D.tokenize_example(tok, ex, max_prompt_len=256, max_len=512)
    assert (len(f["input_ids"]), len(f["labels"]), f["prompt_len"], f["prompt_truncated"]) == (512, 512, 256, True)
    assert f["input_ids"][:256] == prompt[:256]                    # the first 256 prompt tokens are kept
    assert f["labels"][:256] == [-100] * 256 and -100 not in f["labels"][256:]
    assert f["input_ids"][-1] != tok.eos_token_id                   # the cut removes the end of the response and EOS
    short = D.tokenize_example(tok, D.InstructionExample("Hi.", "", "Hello"), 256, 512)
    assert not short["prompt_truncated"] and short["input_ids"][-1] == tok.eos_token_id
    # a short prompt with a long response: only the total is cut
    g = D.tokenize_example(tok, D.InstructionExample("Hi.", "", "river " * 700), 256, 512)
    assert len(g["input_ids"]) == 512 and g["prompt_len"] == len(tok.encode(D.build_prompt("Hi."), add_special_tokens=False))
    assert len(D.tokenize_examples(tok, [ex, D.InstructionExample("Hi.", "", "Hello")])) == 2
    assert len(D.tokenize_examples(tok, [ex, D.InstructionExample("Hi.", "", "Hello")], long_prompts="drop")) == 1
    with pytest.raises(ValueError, match="must be smaller than max_len"):
        D.tokenize_example(tok, ex, max_prompt_len=512, max_len=512)
    with pytest.raises(ValueError, match="long_prompts"):
        D.tokenize_examples(tok, [ex], long_prompts="keep")
    assert D.prompt_ids(tok, ex) == prompt[:256]


def test_collate_padding(tok):
    feats = [D.tokenize_example(tok, D.InstructionExample("Hi.", "", "Hello there")),
             D.tokenize_example(tok, D.InstructionExample("Reverse.", "a b c d e f", "f e d c b a"))]
    b = D.make_collate(tok)(feats)
    n = max(len(f["input_ids"]) for f in feats)
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert all(v.shape == (2, n) and v.dtype == torch.long for v in b.values())
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        assert b["input_ids"][i, :k].tolist() == f["input_ids"] and b["labels"][i, :k].tolist() == f["labels"]
        assert (b["input_ids"][i, k:] == tok.pad_token_id).all() and (b["labels"][i, k:] == -100).all()
        assert b["attention_mask"][i].tolist() == [1] * k + [0] * (n - k)
    assert D.collate(feats, pad_id=3, pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0
    loader = torch.utils.data.DataLoader(feats, batch_size=2, collate_fn=D.make_collate(tok))
    assert next(iter(loader))["input_ids"].shape == (2, n)


def test_pad_falls_back_to_eos():
    assert D.pad_token_id(WordTokenizer()) == 1
    assert D.pad_token_id(WordTokenizer(pad_token_id=9)) == 9
    b = D.make_collate(WordTokenizer())([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}])
    assert b["input_ids"].tolist() == [[5, 6], [7, 1]] and b["labels"].tolist() == [[-100, 6], [7, -100]]
    with pytest.raises(ValueError, match="equal length"):
        D.collate([{"input_ids": [1, 2], "labels": [1]}], 0)


# ---------------------------------------------------------------- validation split and training pool

def test_validation_split_size_and_determinism():
    xs = list(range(3000))
    tr, va = D.split_validation(xs)                                       # the official: the first dev_num = 1000
    assert (tr, va) == (xs[1000:], xs[:1000])
    assert D.split_validation(xs, 5)[1] == [0, 1, 2, 3, 4]
    tr0, va0 = D.split_validation(xs, 1000, seed=0)                        # the option: a seeded draw
    assert (len(tr0), len(va0)) == (2000, 1000) and D.split_validation(xs, 1000, seed=0) == (tr0, va0)
    assert sorted(tr0 + va0) == xs and va0 == sorted(va0) and va0 != va
    assert D.split_validation(xs, 1000, seed=1)[1] != va0
    with pytest.raises(ValueError, match="must be smaller"):
        D.split_validation(xs[:10], 10)


def test_load_train_valid(tmp_path):
    root = D.write_synthetic_instruction_data(tmp_path / "data", n_train=120, n_test=10, seed=3)
    pool = D.read_examples(root / D.TRAIN_FILE)
    tr, va = D.load_train_valid(root, n_valid=20)
    assert (tr, va) == (pool[20:], pool[:20])                             # the first 20 lines, as the official
    tr0, va0 = D.load_train_valid(root, n_valid=20, seed=0)
    assert (len(tr0), len(va0)) == (100, 20) and va0 != va
    assert D.load_train_valid(root, n_valid=20, seed=0) == (tr0, va0)
    assert sorted(map(D.example_key, tr0 + va0)) == sorted(map(D.example_key, pool))
    tr2, va2 = D.load_train_valid(root, n_valid=20, exclude=va[:5] + tr[:3])   # dropped after the split
    assert (tr2, va2) == (pool[23:], pool[5:20])


# ---------------------------------------------------------------- test sets

def test_test_set_registry():
    assert list(D.TEST_SETS) == ["dolly", "self_inst", "vicuna", "sinst", "uinst"]
    assert {k: s.size for k, s in D.TEST_SETS.items()} == dict(dolly=500, self_inst=252, vicuna=80, sinst=1694, uinst=10000)
    assert {k: s.min_reference_tokens for k, s in D.TEST_SETS.items()} == dict(dolly=None, self_inst=None, vicuna=None,
                                                                              sinst=11, uinst=11)
    assert D.TEST_SETS["sinst"].path == "sinst/11_/valid.jsonl" and D.TEST_SETS["self_inst"].path == "self-inst/valid.jsonl"
    assert ">= 11 tokens" in D.TEST_SETS["uinst"].rule
    with pytest.raises(KeyError, match="unknown test set"):
        D.load_test_set("nope", "/nonexistent")


def test_min_reference_token_filter(tmp_path):
    words = lambda k: " ".join(["w"] * k)
    rows = [{"instruction": f"i{k}", "input": "", "output": words(k)} for k in (1, 10, 11, 12, 30)]
    rows.append({"instruction": "multi", "input": "", "output": [words(11), words(2)]})   # the first reference counts
    rows.append({"instruction": "multi2", "input": "", "output": [words(2), words(11)]})
    for name in ("sinst", "uinst", "dolly"):
        path = tmp_path / D.TEST_SETS[name].path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = WordTokenizer()
    for name in ("sinst", "uinst"):
        kept = D.load_test_set(name, tmp_path, tokenizer=tok)
        assert [e.instruction for e in kept] == ["i11", "i12", "i30", "multi"]
        assert len(D.load_test_set(name, tmp_path)) == len(rows)              # no tokenizer: taken as filtered
    assert len(D.load_test_set("dolly", tmp_path, tokenizer=tok)) == len(rows)  # Dolly has no length rule
    assert D.filter_min_reference_tokens(D.read_examples(tmp_path / "sinst/11_/valid.jsonl"), tok, 12)[0].instruction == "i12"
    with pytest.raises(ValueError, match="expected 1694"):
        D.load_test_set("sinst", tmp_path, tokenizer=tok, check_size=True)


def test_min_reference_token_filter_with_bpe(tok, tmp_path):
    root = D.write_synthetic_instruction_data(tmp_path / "data", n_train=50, n_test=60, seed=0)
    full = D.load_test_set("sinst", root)
    kept = D.load_test_set("sinst", root, tokenizer=tok)
    expected = [e for e in full if len(tok.encode(e.references[0], add_special_tokens=False)) >= 11]
    assert kept == expected and 0 < len(kept) < len(full)


# ---------------------------------------------------------------- synthetic data and tokenizer

def test_synthetic_determinism_and_exactness():
    a = D.synthetic_instructions(300, seed=7)
    assert a == D.synthetic_instructions(300, seed=7) and a != D.synthetic_instructions(300, seed=8)
    assert D.synthetic_instructions(100, seed=7) == a[:100]
    assert {r["category"] for r in a} == set(D.SYNTHETIC_TASKS)
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in a)
    with_ctx = [r for r in a if r["context"]]
    assert 0 < len(with_ctx) < len(a)
    for r in with_ctx:
        items, t = r["context"], r["category"]
        if t == "reverse": assert r["response"] == " ".join(reversed(items.split()))
        elif t == "sort": assert r["response"] == " ".join(map(str, sorted(map(int, items.split()))))
        elif t == "uppercase": assert r["response"] == items.upper()
        elif t == "arithmetic":
            x, op, y = items.split()
            assert int(r["response"]) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        else:
            old, new = r["instruction"].split("'")[1], r["instruction"].split("'")[3]
            assert r["response"] == " ".join(new if w == old else w for w in items.split())
    keys = {(r["instruction"], r["context"]) for r in a}
    assert not keys & {(r["instruction"], r["context"]) for r in D.synthetic_instructions(300, seed=9, exclude=keys)}


def test_tokenizer_round_trip(tok, tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == tok.pad_token_id == 0
    assert tok.model_max_length == 1024
    for text in ("Reverse the order of the words.", D.build_prompt("Sort.", "3 1 2") + "1 2 3",
                 "unseen: Zürich 東京 \t tabs  and  spaces\n\n\nend", ""):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.decode([5, tok.eos_token_id], skip_special_tokens=True) == tok.decode([5])
    again = AutoTokenizer.from_pretrained(str(tok_dir))
    assert again.encode("apple river", add_special_tokens=False) == tok.encode("apple river", add_special_tokens=False)
    assert not [p for p in tok_dir.parent.iterdir() if p.name.startswith(".")]   # no temporary folder left


def test_write_synthetic_layout_idempotent_atomic(tmp_path, monkeypatch):
    root = D.write_synthetic_instruction_data(tmp_path / "data", n_train=40, n_test=8, seed=1)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted([D.SYNTHETIC_MANIFEST, D.TRAIN_FILE] + [s.path for s in D.TEST_SETS.values()])
    raw = D.read_jsonl(root / D.TRAIN_FILE)
    assert raw == D.synthetic_instructions(40, seed=1)                       # Dolly layout
    for name in D.TEST_SETS:
        rows = D.read_jsonl(root / D.TEST_SETS[name].path)
        assert len(rows) == 8 and set(rows[0]) == {"instruction", "input", "output"}   # MiniLLM layout
        assert isinstance(rows[0]["output"], list) == (name == "self_inst")
    stamp = (root / D.TRAIN_FILE).stat().st_mtime_ns
    assert D.write_synthetic_instruction_data(root, n_train=40, n_test=8, seed=1) == root   # a no-op
    assert (root / D.TRAIN_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.write_synthetic_instruction_data(root, n_train=41, n_test=8, seed=1)
    D.write_synthetic_instruction_data(root, n_train=41, n_test=8, seed=1, overwrite=True)
    assert len(D.read_jsonl(root / D.TRAIN_FILE)) == 41

    foreign = tmp_path / "real"
    (foreign / "dolly").mkdir(parents=True)
    (foreign / "dolly" / "raw.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="never replaced"):
        D.write_synthetic_instruction_data(foreign, overwrite=True)

    calls = []
    real_write = D._write_jsonl
    def failing(path, rows):
        calls.append(path)
        if len(calls) == 3: raise OSError("disk full")
        real_write(path, rows)
    monkeypatch.setattr(D, "_write_jsonl", failing)
    with pytest.raises(OSError, match="disk full"):
        D.write_synthetic_instruction_data(tmp_path / "half", n_train=20, n_test=4, seed=0)
    assert not (tmp_path / "half").exists()                                 # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # temporary folder removed
    with pytest.raises(OSError, match="disk full"):                          # a failed overwrite keeps the old copy
        calls.clear()
        D.write_synthetic_instruction_data(root, n_train=42, n_test=8, seed=1, overwrite=True)
    assert len(D.read_jsonl(root / D.TRAIN_FILE)) == 41


def test_missing_local_data_names_the_set_the_path_and_both_ways_to_get_it(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(DataNotFoundError) as e:
        D.load_train_valid(empty)
    msg = str(e.value)
    assert msg.startswith(f"Dolly training pool: {empty / D.TRAIN_FILE} not found")
    assert D.MINILLM_DATA in msg and repr(D.DOLLY_HUB_ID) in msg and "root=None" in msg
    for name, spec in D.TEST_SETS.items():
        with pytest.raises(DataNotFoundError) as e:
            D.load_test_set(name, empty)
        assert str(e.value).startswith(f"test set {spec.title}: {empty / spec.path} not found")
        assert repr(spec.hub_id) in str(e.value)


def test_a_hub_dataset_that_cannot_be_loaded_is_data_not_found(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants as hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)     # nothing touches the network
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataNotFoundError) as e:
        D.load_test_set("vicuna", None, cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert msg.startswith("the `datasets` dataset 'MiniLLM/Vicuna' (split 'train', files 'valid.jsonl') could not be "
                          "loaded") and "pass a local jsonl file" in msg and "\n" not in msg
    with pytest.raises(DataNotFoundError, match="'json'"):             # the json builder on a missing file
        D.load_instructions("json", data_files=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path / "c2"))


# ---------------------------------------------------------------- the pre-training corpus (OpenWebText layout)

def test_corpus_standin_layout(tmp_path):
    file = D.write_lm_corpus_standin(tmp_path, n_docs=30, seed=1)
    assert file == tmp_path / "openwebtext" / "data.txt" == tmp_path / D.LM_CORPUS_FILE
    docs = D.synthetic_documents(30, seed=1)
    assert docs == D.synthetic_documents(30, seed=1) != D.synthetic_documents(30, seed=2)
    text = file.read_text(encoding="utf-8")
    assert text == "".join(re.sub(r"\n+", "<@x(x!>", d) + "\n" for d in docs)     # get_openwebtext.py's write
    assert text.count("\n") == 30 and "<@x(x!>" in text and any("\n\n" in d for d in docs)
    assert D.write_lm_corpus_standin(tmp_path, n_docs=30, seed=1) == file          # the same call: a no-op
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.write_lm_corpus_standin(tmp_path, n_docs=31, seed=1)
    assert D.write_lm_corpus_standin(tmp_path, n_docs=31, seed=1, overwrite=True) == file
    assert file.read_text(encoding="utf-8").count("\n") == 31
    real = tmp_path / "real" / "openwebtext"
    real.mkdir(parents=True)
    (real / "data.txt").write_text("a real document\n")
    with pytest.raises(FileExistsError, match="never replaced"):
        D.write_lm_corpus_standin(tmp_path / "real", n_docs=5, overwrite=True)
    assert (real / "data.txt").read_text() == "a real document\n"
    assert not list(tmp_path.glob("openwebtext/.data.txt.partial-*"))


def test_corpus_blocks_are_the_official_stream_cut(tmp_path, tok):
    "Per line: markers back to newlines (the line's own newline kept), tokens + EOS; concatenated; cut in order."
    file = tmp_path / "data.txt"
    lines = ["First document.<@x(x!>Second paragraph of it.", "", "Another one<@x(x!>with<@x(x!>three paragraphs.",
             "Last line without a final newline"]
    file.write_text("\n".join(lines), encoding="utf-8")
    docs = ["First document.\nSecond paragraph of it.\n", "\n", "Another one\nwith\nthree paragraphs.\n",
            "Last line without a final newline"]
    eos = tok.eos_token_id
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=False) + [eos]]
    blocks = D.read_lm_corpus(file, tok, max_len=7)
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 7] for i in range(0, len(stream) // 7 * 7, 7)]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert D.read_lm_corpus(tmp_path, tok, 7) == blocks                           # a folder holding data.txt
    assert D.read_lm_corpus(file, tok, 7, skip_blocks=2, max_blocks=3) == blocks[2:5]
    assert D.read_lm_corpus(file, tok, 7, max_blocks=len(blocks) + 9) == blocks
    root = tmp_path / "root"
    D.write_lm_corpus_standin(root, n_docs=20)
    assert D.read_lm_corpus(root, tok, 16) == D.read_lm_corpus(root / D.LM_CORPUS_FILE, tok, 16)


def test_corpus_blocks_train_with_the_collate(tmp_path, tok):
    blocks = D.read_lm_corpus(D.write_lm_corpus_standin(tmp_path, n_docs=10), tok, max_len=12)
    batch = D.make_collate(tok)(blocks[:3])
    assert batch["input_ids"].shape == (3, 12) and bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_corpus_bad_inputs(tmp_path, tok):
    short = tmp_path / "short.txt"; short.write_text("A few words.\n")
    with pytest.raises(ValueError, match=r"make 0 blocks of max_len=512.*longer corpus, a smaller max_len"):
        D.read_lm_corpus(short, tok, max_len=512)
    n = len(D.read_lm_corpus(short, tok, max_len=2))
    with pytest.raises(ValueError, match=r"skip_blocks=.*none is left.*smaller skip_blocks"):
        D.read_lm_corpus(short, tok, max_len=2, skip_blocks=n)
    empty = tmp_path / "empty.txt"; empty.write_text("")
    with pytest.raises(ValueError, match="is empty.*one document a line"):
        D.read_lm_corpus(empty, tok)
    with pytest.raises(DataNotFoundError, match=r"no data.txt at .*nowhere.*get_openwebtext.py.*write_lm_corpus_standin"):
        D.read_lm_corpus(tmp_path / "nowhere", tok)
    binary = tmp_path / "processed" / "gpt2" / "512" / "10M"
    binary.mkdir(parents=True)
    (binary / "train_0.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="processed binary form.*raw text file data.txt"):
        D.read_lm_corpus(binary, tok)
    with pytest.raises(ValueError, match="processed binary form"):
        D.read_lm_corpus(tmp_path / "processed", tok)
    for kw, name in ((dict(max_len=0), "max_len"), (dict(max_len=2.5), "max_len"), (dict(skip_blocks=-1), "skip_blocks"),
                     (dict(max_blocks=0), "max_blocks")):
        with pytest.raises(ValueError, match=f"{name} must be a"):
            D.read_lm_corpus(short, tok, **kw)
    with pytest.raises(ValueError, match="n_docs must be a positive integer"):
        D.write_lm_corpus_standin(tmp_path / "x", n_docs=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        D.read_lm_corpus(short, type("NoEos", (), {"eos_token_id": None, "encode": lambda self, t, **k: [1]})(), 2)
