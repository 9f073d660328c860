"""Tests of `abkd.llm.eval`, the MiniLLM-protocol evaluation: ROUGE-L against hand-computed values, generation (EOS,
left padding, the length cap, '<|endoftext|>' cut, seeds) and its independence of batch size and process count, the seed
aggregate and its record."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import abkd.llm.eval as ev
from abkd.llm.eval import (PROTOCOL_SEEDS, PerExampleSampler, as_eval_example, build_prompt, clean_response,
                           encode_prompts, evaluate_rouge, evaluation_record, example_seed, generate_responses,
                           rouge_l, sample_response_ids)
from abkd.results import load_record

SENTENCES = ["the cat sat on the mat", "a dog runs quickly in the park", "hi there, how are you",
             "Below is an instruction that describes a task.", "### Instruction: ### Response:"]


def make_tokenizer(eos="<|endoftext|>", pad=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[eos], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **({"pad_token": eos} if pad else {}))


def make_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models: one intra-op thread (thread hand-offs cost more than the matrix products, worse on a busy machine)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def force_tokens(model, tokens):
    "lm_head hook: the k-th forward pass (0 = the prompt) puts all mass on tokens[k]; returns (handle, calls)."
    calls = []
    def hook(module, inputs, out):
        k = min(len(calls), len(tokens) - 1)
        calls.append(k)
        forced = torch.full_like(out, -1e4)
        forced[..., tokens[k]] = 1e4
        return forced
    return model.lm_head.register_forward_hook(hook), calls


# ---------------------------------------------------------------- ROUGE-L

def test_rouge_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6, abs=1e-12)
    # stemming: dogs->dog, running/runs->run, quickly->quickli != quick: LCS 2, P = 2/5, R = 2/4, F = 4/9
    assert rouge_l(["The dogs were running quickly"], [["a dog runs quick"]]) == pytest.approx(100 * 4 / 9, abs=1e-12)
    # P = 2/3, R = 2/4 ("the cat"), F = 2PR/(P+R) = 4/7
    assert rouge_l(["the cat slept"], [["the big cat sat"]]) == pytest.approx(100 * 4 / 7, abs=1e-12)


def test_rouge_multi_reference_takes_max_then_mean():
    # "a b c d" vs "a x": F = 1/3; vs "a b c y": F = 3/4 -> 3/4 (a mean over references would give 13/24)
    assert rouge_l(["a b c d"], [["a x", "a b c y"]]) == pytest.approx(75.0, abs=1e-12)
    assert rouge_l(["a b c d"], [["a b c y", "a x"]]) == pytest.approx(75.0, abs=1e-12)
    two = rouge_l(["the cat sat on the mat", "a b c d"], [["the cat is on the mat"], ["a x", "a b c y"]])
    assert two == pytest.approx(100 * (5 / 6 + 3 / 4) / 2, abs=1e-12)


def test_rouge_scale_and_text_handling():
    assert rouge_l(["a b"], [["a b"]]) == 100.0                   # x 100, not a fraction
    assert rouge_l(["Hello, World!"], [["hello world"]]) == 100.0   # rouge_score's tokenizer: case, punctuation
    assert rouge_l(["", "x"], [["x"], ["x"]]) == 50.0               # empty prediction: 0
    assert rouge_l(["x y"], [["z"]]) == 0.0


@pytest.mark.parametrize("preds, refs, msg", [
    (["a"], [["a"], ["b"]], "1 predictions but 2 reference lists"),
    (["a", "b"], [["a"], []], "references[1] is empty"),
    (["a", 3], [["a"], ["b"]], "prediction 1 is a int"),
    (["a", "b"], [["a"], ["b", None]], "references[1][1] is a NoneType"),
    (["a"], ["a"], "references[0] must be a list"),
    ([], [], "no examples"),
    ("a", [["a"]], "predictions must be a list"),
])
def test_rouge_errors(preds, refs, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        rouge_l(preds, refs)


# ---------------------------------------------------------------- prompts and the sampler

def test_encode_prompts_keeps_the_start(tok):
    long = "the cat sat on the mat " * 40
    ids = encode_prompts(tok, ["hi there", long], max_prompt_len=16)
    assert ids[0] == tok.encode("hi there")
    assert ids[1] == tok.encode(long)[:16]
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        encode_prompts(tok, ["hi", ""])


def test_build_prompt_template():
    assert build_prompt("Do it.") == ("Below is an instruction that describes a task. Write a response that "
                                      "appropriately completes the request.\n\n### Instruction:\nDo it.\n\n### Response:\n")
    assert build_prompt("Do it.", "data").endswith("### Instruction:\nDo it.\n\n### Input:\ndata\n\n### Response:\n")


def test_sampler_distribution_and_support():
    n = 3000
    row = torch.tensor([0.0, 1.0, float("-inf"), 2.0])
    out = PerExampleSampler([torch.Generator().manual_seed(example_seed(10, i)) for i in range(n)])(None, row.repeat(n, 1))
    assert (torch.isfinite(out).sum(-1) == 1).all()
    counts = torch.bincount(out.argmax(-1), minlength=4).double()
    assert counts[2] == 0
    assert torch.allclose(counts / n, torch.softmax(row.double(), -1), atol=0.03)


# ---------------------------------------------------------------- generation

def test_stops_at_eos(tok, model):
    a, b, c = tok.encode("hi"), tok.encode(" there"), tok.encode(" cat")
    forced = [a[0], b[0], c[0], tok.eos_token_id, a[0]]
    handle, calls = force_tokens(model, forced)
    try:
        ids = sample_response_ids(model, tok, ["the cat", "a dog runs quickly"], 10, max_prompt_len=16, max_len=48)
        assert calls == [0, 1, 2, 3]                                 # 4 forward passes: stopped at EOS, not at 32
        calls.clear()
        text = generate_responses(model, tok, ["the cat"], 10, max_prompt_len=16, max_len=48)
    finally:
        handle.remove()
    assert ids == [forced[:3], forced[:3]]
    assert text == [tok.decode(forced[:3]).strip()]


def test_left_padding_with_eos_as_pad(monkeypatch):
    tok = make_tokenizer(pad=False)                                  # no pad token: eos pads, as MiniLLM's GPT-2
    model = make_model(tok)
    seen = {}
    real = model.generate
    def spy(**kw):
        seen.update(kw)
        return real(**kw)
    monkeypatch.setattr(model, "generate", spy)
    short, long = tok.encode("hi"), tok.encode("the cat sat on the mat")
    generate_responses(model, tok, ["hi", "the cat sat on the mat"], 10, max_prompt_len=32, max_len=36)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    width = len(long)
    assert ids.shape == (2, width)
    assert ids[0].tolist() == [tok.eos_token_id] * (width - len(short)) + short
    assert mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert ids[1].tolist() == long and mask[1].tolist() == [1] * width
    assert seen["generation_config"].max_new_tokens == 4 and seen["generation_config"].pad_token_id == tok.eos_token_id
    assert seen["generation_config"].no_repeat_ngram_size == 6
    assert tok.padding_side == "right"                              # the caller's tokenizer is left alone


def test_length_cap_512(tok, model):
    # EOS never drawn: every response runs to max_new_tokens = 512 - 256 = 256, so prompt + response <= 512
    def no_eos(module, inputs, out):
        out = out.clone()
        out[..., tok.eos_token_id] = float("-inf")
        return out
    handle = model.lm_head.register_forward_hook(no_eos)
    long = " ".join(["zq"] * 400)
    try:
        ids = sample_response_ids(model, tok, [long, "the cat"], 10, batch_size=2)
    finally:
        handle.remove()
    assert len(tok.encode(long)) > 256
    assert [len(r) for r in ids] == [256, 256]
    assert len(encode_prompts(tok, [long])[0]) + len(ids[0]) == 512


def test_cut_at_end_of_text_string():
    assert clean_response("  yes<|endoftext|>no ") == "yes"
    assert clean_response("a<n>b ") == "a\nb"
    # a tokenizer whose EOS is "</s>": "<|endoftext|>" is then ordinary text that the model can spell out
    tok = make_tokenizer(eos="</s>")
    model = make_model(tok)
    spelled = tok.encode("hi<|endoftext|> there")
    assert tok.decode(spelled, skip_special_tokens=True) == "hi<|endoftext|> there"
    handle, _ = force_tokens(model, spelled + [tok.eos_token_id])
    try:
        out = generate_responses(model, tok, ["the cat"], 10, max_prompt_len=8, max_len=64)
    finally:
        handle.remove()
    assert out == ["hi"]


PROMPTS = [build_prompt("Name a colour."), "the cat", build_prompt("Sort these.", "b a c"), "a dog runs", "hi", "x y z"]
KW = dict(max_prompt_len=32, max_len=44)


def test_seed_determinism_and_independence(tok, model):
    base = sample_response_ids(model, tok, PROMPTS, 10, batch_size=1, **KW)
    torch.manual_seed(999)                                           # the global RNG plays no part
    assert sample_response_ids(model, tok, PROMPTS, 10, batch_size=1, **KW) == base
    assert sample_response_ids(model, tok, PROMPTS, 10, batch_size=4, **KW) == base
    assert sample_response_ids(model, tok, PROMPTS, 10, batch_size=3, **KW) == base
    # process-count independence: each shard passes its global positions
    shards = [sample_response_ids(model, tok, PROMPTS[i::2], 10, example_ids=list(range(i, 6, 2)), **KW) for i in (0, 1)]
    assert [shards[i % 2][i // 2] for i in range(6)] == base
    assert sample_response_ids(model, tok, PROMPTS, 20, **KW) != base
    texts = generate_responses(model, tok, PROMPTS, 10, batch_size=4, **KW)
    assert texts == [clean_response(tok.decode(r, skip_special_tokens=True)) for r in base]


def test_generation_argument_errors(tok, model):
    with pytest.raises(ValueError, match="max_len must be an int >= 9"):
        sample_response_ids(model, tok, ["a"], 10, max_prompt_len=8, max_len=8)
    with pytest.raises(ValueError, match="example_ids must be distinct"):
        sample_response_ids(model, tok, ["a", "b"], 10, example_ids=[0, 0])
    with pytest.raises(ValueError, match="seed must be"):
        sample_response_ids(model, tok, ["a"], 1.5)


# ---------------------------------------------------------------- seeds, aggregate, record

def test_examples_formats():
    assert as_eval_example(("p", ["r"])) == ("p", ["r"])
    assert as_eval_example({"prompt": "a<n>b", "output": "r"}) == ("a\nb", ["r"])
    assert as_eval_example({"instruction": "Do it.", "input": "x", "references": ["r", "s"]}) == \
        (build_prompt("Do it.", "x"), ["r", "s"])
    assert as_eval_example(SimpleNamespace(prompt="p", references=["r"])) == ("p", ["r"])
    with pytest.raises(ValueError, match="example 3: references"):
        as_eval_example({"prompt": "p", "references": []}, 3)
    with pytest.raises(ValueError, match="example 2 has no prompt"):
        as_eval_example({"references": ["r"]}, 2)


def test_evaluate_rouge_seeds_mean_sample_std(monkeypatch, tmp_path):
    # generation replaced by a seed-dependent answer: seed 10 -> "a", 20 -> "a b", ... against reference "a b c d"
    words = "a b c d e".split()
    calls = []
    def fake(model, tokenizer, prompts, seed, **kw):
        calls.append((seed, kw))
        return [" ".join(words[:seed // 10])] * len(prompts)
    monkeypatch.setattr(ev, "generate_responses", fake)
    res = evaluate_rouge(None, None, [("p", ["a b c d"]), ("q", "a b c d")], batch_size=2)
    # LCS = min(k, 4); F = 2k/(k+4) for k <= 4, 8/9 for k = 5 -> 40, 66.67, 85.71, 100, 88.89
    expected = [100 * 2 / 5, 100 * 4 / 6, 100 * 6 / 7, 100.0, 100 * 8 / 9]
    assert list(res["per_seed"]) == ["10", "20", "30", "40", "50"] and res["seeds"] == list(PROTOCOL_SEEDS)
    assert list(res["per_seed"].values()) == pytest.approx(expected, abs=1e-12)
    mean = sum(expected) / 5
    assert res["mean"] == pytest.approx(mean, abs=1e-12)
    assert res["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in expected) / 4), abs=1e-12)   # n - 1
    assert res["n_examples"] == 2 and [c[0] for c in calls] == [10, 20, 30, 40, 50]
    assert calls[0][1] == {"batch_size": 2}
    assert res["generation"]["max_new_tokens"] == 256 and res["generation"]["no_repeat_ngram_size"] == 6

    rec = evaluation_record(tmp_path / "eval.json", res, experiment="llm_dolly", config={"model": "gpt2-base"})
    back = load_record(tmp_path / "eval.json")
    assert back["metrics"]["rougeL"]["per_seed"] == pytest.approx(res["per_seed"])
    assert back["metrics"]["rougeL"]["std"] == pytest.approx(res["std"])
    assert back["config"]["model"] == "gpt2-base" and back["config"]["seeds"] == [10, 20, 30, 40, 50]
    assert back["seed"] is None and rec["experiment"] == "llm_dolly"

    one = evaluate_rouge(None, None, [("p", ["a b c d"])], seeds=[40])
    assert one["std"] is None and one["mean"] == 100.0
    back = evaluation_record(tmp_path / "one.json", one, experiment="llm_dolly")
    assert back["seed"] == 40 and "std" not in back["metrics"]["rougeL"]
    with pytest.raises(ValueError, match="seeds must be distinct"):
        evaluate_rouge(None, None, [("p", ["r"])], seeds=[10, 10])
    with pytest.raises(TypeError):
        evaluate_rouge(None, None, [("p", ["r"])], no_such_option=1)


def test_evaluate_rouge_end_to_end(tok, model):
    res = evaluate_rouge(model, tok, [("the cat", ["sat on the mat"]), {"instruction": "Say hi.", "output": "hi"}],
                         seeds=(10, 20), max_prompt_len=32, max_len=36, batch_size=2)
    again = evaluate_rouge(model, tok, [("the cat", ["sat on the mat"]), {"instruction": "Say hi.", "output": "hi"}],
                           seeds=(10, 20), max_prompt_len=32, max_len=36, batch_size=1)
    assert res["per_seed"] == again["per_seed"]
    assert all(0.0 <= v <= 100.0 for v in res["per_seed"].values())
    json.dumps(res)


# ---------------------------------------------------------------- teacher outputs (SeqKD's data)
def test_teacher_outputs_are_the_teachers_forced_samples(tok, model):
    "With the teacher's head forced to emit 'cat' then EOS, every example's output becomes exactly 'cat'."
    from abkd.llm.data import InstructionExample
    from abkd.llm.eval import teacher_outputs
    cat = tok.encode("cat")
    assert len(cat) == 1
    handle, _ = force_tokens(model, [cat[0], tok.eos_token_id])
    train = [InstructionExample("Name an animal.", "", "A dog."), InstructionExample("Sort.", "b a", "a b")]
    try: out = teacher_outputs(model, tok, train, seed=10, max_prompt_len=32, max_len=40)
    finally: handle.remove()
    assert [e.output for e in out] == ["cat", "cat"] and [e.references for e in out] == [["cat"], ["cat"]]
    assert [(e.instruction, e.input) for e in out] == [("Name an animal.", ""), ("Sort.", "b a")]
    assert [e.output for e in train] == ["A dog.", "a b"]                      # the inputs are not modified


def test_teacher_outputs_seeded_batch_independent_and_errors(tok, model):
    from abkd.llm.data import InstructionExample
    from abkd.llm.eval import teacher_outputs
    train = [InstructionExample(f"Say {w}.", "", w) for w in ("hi", "cat", "dog", "mat")]
    kw = dict(max_prompt_len=32, max_len=48)
    a = [e.output for e in teacher_outputs(model, tok, train, seed=10, batch_size=1, **kw)]
    b = [e.output for e in teacher_outputs(model, tok, train, seed=10, batch_size=4, **kw)]
    c = [e.output for e in teacher_outputs(model, tok, train, seed=20, batch_size=4, **kw)]
    assert a == b and a != c
    assert a == generate_responses(model, tok, [e.prompt for e in train], 10, no_repeat_ngram_size=0, **kw)
    with pytest.raises(ValueError, match="takes InstructionExample records"):
        teacher_outputs(model, tok, [{"instruction": "x", "output": "y"}])
    with pytest.raises(ValueError, match="no examples"):
        teacher_outputs(model, tok, [])
