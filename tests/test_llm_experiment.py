"""The LLM reproduction's paper path end to end on local stand-ins (models and tokenizer from folders via
from_pretrained, MiniLLM's data layout, the ≥11-token rule on two test sets), methods from the recipes over an lr grid
selected on validation, records carrying the recipes, and the table beside the paper's cells."""
import json
import math
from pathlib import Path

import pytest
import torch

from abkd.llm.data import (TEST_SETS, read_jsonl, synthetic_texts, train_bpe_tokenizer, write_lm_corpus_standin,
                           write_synthetic_instruction_data, TRAIN_FILE)
from abkd.llm.eval import evaluation_record
from abkd.llm.experiment import (LLMScale, TEST_COLUMNS, prepare_data, reproduce_paper, results_table, select_lr,
                                 tiny_gpt2, train_method, train_stage)
from abkd.llm.recipes import init_recipe, method_config
from abkd.llm.train import validation_loss
from abkd.results import load_records, paper_number, paper_std
from abkd.training import DataNotFoundError

LONG_REF = "the quick brown fox jumps over the lazy dog near the river bank today"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    "Synthetic MiniLLM-layout data, a BPE tokenizer, and a tiny teacher and student saved as local folders."
    tmp = tmp_path_factory.mktemp("llm")
    data = write_synthetic_instruction_data(tmp / "data", n_train=60, n_test=3, seed=0)
    for name in ("sinst", "uinst"):                 # references of >= 11 tokens survive the filter, short ones do not
        rows = [dict(instruction="Write a sentence.", input="", output=LONG_REF),
                dict(instruction="Say hi.", input="", output="hi")]
        (Path(data) / TEST_SETS[name].path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer(synthetic_texts(read_jsonl(Path(data) / TRAIN_FILE)) + [LONG_REF], tmp / "tok",
                              vocab_size=400)
    for name, shape, seed in (("teacher", dict(n_layer=2, n_embd=32, n_head=2), 1),
                              ("student", dict(n_layer=1, n_embd=16, n_head=2), 0)):
        tiny_gpt2(shape, tok, 256, seed).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    scale = LLMScale(n_valid=6, max_prompt_len=128, max_len=160, n_positions=256, methods=("sft", "kd", "rkl", "seqkd", "abkd"),
                     lr_grid=(1e-3, 3e-4), kd_epochs=1, teacher_epochs=1, init_epochs=1, sft_lr=1e-3,
                     micro_batch_size=8, grad_accum=1, warmup_steps=0, select_examples=2, seeds=(10, 20))
    return dict(tmp=tmp, data=data, tok=tok, scale=scale)


def test_paper_path_on_local_models(local):
    tmp, scale = local["tmp"], local["scale"]
    corpus = write_lm_corpus_standin(tmp / "owt", n_docs=40)                 # the OpenWebText term, on a stand-in
    written = reproduce_paper(tmp / "out", local["data"], teacher_id=str(tmp / "teacher"),
                              student_id=str(tmp / "student"), progress=False, scale=scale, student="gpt2-medium",
                              lm_corpus=corpus)
    recs = load_records(tmp / "out" / "llm" / "eval")
    models = {r["config"]["model"] for r in recs}
    assert models == {"teacher_sft", "student_init", "sft", "kd", "rkl", "seqkd", "abkd"}
    assert len(recs) == 7 * len(TEST_SETS)
    sinst = [r for r in recs if r["config"]["test_set"] == "sinst"]
    assert all(r["metrics"]["n_examples"] == 1 for r in sinst)            # "hi" filtered out by the >= 11-token rule
    ab = next(r for r in recs if r["config"]["model"] == "abkd")["config"]
    assert ab["recipe"]["loss_params"] == dict(alpha=0.2, beta=0.7) and "Table 7" in ab["recipe"]["source"]
    assert ab["recipe"]["student"] == "gpt2-medium" and ab["recipe"]["lr_grid_run"] == [1e-3, 3e-4]
    assert ab["selected_lr"] == max(ab["lr_runs"], key=lambda r: r["score"])["lr"]
    assert next(r for r in recs if r["config"]["model"] == "seqkd")["config"]["recipe"]["data"] == "teacher_outputs"
    used = {r["config"]["model"]: r["config"]["recipe"]["lm_corpus"] for r in recs if "lm_corpus" in r["config"]["recipe"]}
    assert used == dict(sft=False, kd=True, rkl=True, seqkd=False, abkd=True)   # every KD method, no SFT run
    assert ab["recipe"]["lm_weight"] == 1.0 and ab["recipe"]["kd_ratio"] == 1.0
    assert "sft_xlarge.sh" in next(r for r in recs if r["config"]["model"] == "teacher_sft")["config"]["recipe"]["source"]
    table = written[-1].read_text()
    part = "GPT-2 Medium (0.3B)"
    assert f"{paper_number(2, 'ABKD', 'S-NI', part):.2f} ({paper_std(2, 'ABKD', 'S-NI', part):.2f})" in table
    assert f"{paper_number(2, 'Teacher', 'Dolly', part):.2f}" in table
    assert "reports no rkl row" in table and "lr grid [0.001, 0.0003]" in table
    assert "LM term (lm_weight 1 on the pre-training corpus) was used by: kd, rkl, abkd." in table
    for lr in (1e-3, 3e-4):
        assert (tmp / "out" / "llm" / "abkd" / f"lr_{lr:g}" / "best" / "config.json").is_file()
    # the ROUGE-L figure is written beside the table, from the evaluation records: one bar per (test set, model)
    from abkd.llm.experiment import FIGURE, rouge_figure
    fig = tmp / "out" / "llm" / FIGURE
    assert fig in written and fig.read_bytes()[:4] == b"\x89PNG"
    axes = rouge_figure(tmp / "out" / "llm" / "eval").axes
    assert [ax.get_title() for ax in axes] == list(TEST_COLUMNS.values())
    dolly = {r["config"]["model"]: sum(r["metrics"]["rougeL"]["per_seed"].values()) / len(r["metrics"]["rougeL"]["per_seed"])
             for r in recs if r["config"]["test_set"] == "dolly" and r["config"]["model"] != "teacher_sft"}
    assert sorted(round(float(p.get_height()), 9) for p in axes[0].patches) == sorted(round(v, 9) for v in dolly.values())


def test_lr_grid_selection_picks_the_best_validation_score(local):
    "Each lr trains from the same initialised student; the kept run is the one whose best validation score is highest."
    tmp, tok, scale = local["tmp"], local["tok"], local["scale"]
    data = prepare_data(local["data"], tok, scale, filter_tests=False)
    out = tmp / "grid"
    init = train_stage("init", init_recipe("gpt2", epochs=1, lr=1e-3, micro_batch_size=8, grad_accum=1), 
                       tiny_gpt2(dict(n_layer=1, n_embd=16, n_head=2), tok, 256, 0), data, out, progress=False)
    teacher = tiny_gpt2(dict(n_layer=2, n_embd=32, n_head=2), tok, 256, 1)
    score = lambda m: -validation_loss(m, data["valid"], data["collate"], torch.device("cpu"))
    grid_scale = LLMScale(**{**scale.__dict__, "lr_grid": (3e-2, 1e-3, 1e-5), "kd_epochs": 2})
    res = train_method("kd", "gpt2", data, out, init["path"], teacher, grid_scale, score, progress=False)
    scores = {r["lr"]: r["score"] for r in res["runs"]}
    assert len(set(scores.values())) == 3                                  # the grid's runs differ
    assert res["lr"] == max(scores, key=scores.get) and res["score"] == max(scores.values())
    from transformers import GPT2LMHeadModel
    assert math.isclose(score(GPT2LMHeadModel.from_pretrained(res["path"])), res["score"], rel_tol=1e-6)
    assert res["config"]["lr"] == res["lr"] and res["config"]["method"] == "kd"


def test_results_table_paper_cells_delta_and_missing(tmp_path):
    res = lambda m: dict(per_seed={"10": m - 0.5, "20": m + 0.5}, mean=m, std=math.sqrt(0.5), n_seeds=2,
                         n_examples=3, seeds=[10, 20], generation={})
    for name, m, extra in (("teacher_sft", 20.0, {}), ("kd", 21.0, dict(recipe=method_config("kd"), selected_lr=1e-4)),
                           ("rkl", 22.0, dict(recipe=method_config("rkl"), selected_lr=5e-4))):
        for test in TEST_SETS:
            evaluation_record(tmp_path / f"{name}_{test}.json", res(m), experiment="llm/rougeL",
                              config=dict(model=name, test_set=test, student="gpt2", **extra))
    table = results_table(tmp_path)
    lines = {l.split(" |")[0].lstrip("| "): l for l in table.splitlines() if l.startswith("| ")}
    kd = paper_number(2, "KD", "UnNI", "GPT-2 (0.1B)")
    assert f"21.00 ± 0.71 | {kd:.2f} ({paper_std(2, 'KD', 'UnNI', 'GPT-2 (0.1B)'):.2f}) | {21 - kd:+.2f} |" in lines["kd: fkl, lr 0.0001"]
    assert f"{paper_number('3/10', 'RKLD', 'Vicuna'):.2f}" in lines["rkl: rkl, lr 0.0005"]
    t = paper_number(2, "Teacher", "Dolly", "GPT-2 (0.1B)")
    assert f"20.00 ± 0.71 | {t:.2f} ({paper_std(2, 'Teacher', 'Dolly', 'GPT-2 (0.1B)'):.2f}) | {20 - t:+.2f}" in lines["teacher (SFT)"]
    assert "No run used the OpenWebText LM term" in table
    large = results_table(tmp_path, "gpt2-large")
    assert large.count("not reported") == len(TEST_COLUMNS) and "reports no rkl row" in large
    with pytest.raises(ValueError, match="known students"):
        results_table(tmp_path, "gpt-5")
    with pytest.raises(ValueError, match="no evaluation records"):
        results_table(tmp_path / "empty")
    # the header names each test set once per cell, and no two cells are the same ('Dolly (Dolly (held-out))' was not)
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert len(head) == len(set(head)) == 1 + 3 * len(TEST_COLUMNS)
    assert all(sum(c.count(n) for n in TEST_COLUMNS.values()) <= 1 for c in head), head
    assert not any("(" in c for c in head), head


def test_train_stage_names_its_progress(monkeypatch, tmp_path):
    "Progress lines of an lr-grid run say '<method> lr <lr>'."
    import abkd.llm.experiment as E
    from abkd.training import current_run
    seen = []
    class Stop(Exception): pass
    def fit_llm(*a, **k): seen.append(current_run()); raise Stop
    monkeypatch.setattr(E, "fit_llm", fit_llm)
    with pytest.raises(Stop): E.train_stage("kd_fkl/lr_0.005", None, None, dict(train=[], valid=[], collate=None, tokenizer=None), tmp_path)
    assert seen == ["kd_fkl lr 0.005"]


def test_paper_path_input_errors(local, tmp_path):
    tmp = local["tmp"]
    with pytest.raises(DataNotFoundError, match="ABKD_LLM_DATA"):
        reproduce_paper(tmp_path, tmp_path / "nowhere", teacher_id=str(tmp / "teacher"),
                        student_id=str(tmp / "student"), progress=False, scale=local["scale"])
    with pytest.raises(ValueError, match="runs the GPT-2 students"):
        reproduce_paper(tmp_path, student="openllama2-3b")
    with pytest.raises(ValueError, match="not provided"):
        reproduce_paper(tmp_path, local["data"], teacher_id=str(tmp / "teacher"), student_id=str(tmp / "student"),
                        scale=local["scale"], methods=("minillm",))
