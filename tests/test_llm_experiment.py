"The LLM reproduction's paper path end to end on local stand-ins: models and tokenizer from folders via from_pretrained, MiniLLM's data layout, the ≥11-token rule on two test sets, records and the table."
import json
from pathlib import Path

from abkd.llm.data import TEST_SETS, read_jsonl, synthetic_texts, train_bpe_tokenizer, write_synthetic_instruction_data, TRAIN_FILE
from abkd.llm.experiment import LLMScale, reproduce_paper, tiny_gpt2
from abkd.results import load_records


def test_paper_path_on_local_models(tmp_path):
    data = write_synthetic_instruction_data(tmp_path / "data", n_train=60, n_test=3, seed=0)
    long_ref = "the quick brown fox jumps over the lazy dog near the river bank today"
    for name in ("sinst", "uinst"):                 # references of >= 11 tokens survive the filter, short ones do not
        path = Path(data) / TEST_SETS[name].path
        rows = [dict(instruction="Write a sentence.", input="", output=long_ref),
                dict(instruction="Say hi.", input="", output="hi")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer(synthetic_texts(read_jsonl(Path(data) / TRAIN_FILE)) + [long_ref], tmp_path / "tok",
                              vocab_size=400)
    for name, shape, seed in (("teacher", dict(n_layer=2, n_embd=32, n_head=2), 1),
                              ("student", dict(n_layer=1, n_embd=16, n_head=2), 0)):
        tiny_gpt2(shape, tok, 256, seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    scale = LLMScale(n_valid=6, max_prompt_len=128, max_len=160, n_positions=256, sft_epochs=1, kd_epochs=1,
                     micro_batch_size=8, lr=1e-3, warmup_steps=0, select_examples=2, seeds=(10, 20))
    written = reproduce_paper(tmp_path / "out", data, teacher_id=str(tmp_path / "teacher"),
                              student_id=str(tmp_path / "student"), progress=False, scale=scale)
    recs = load_records(tmp_path / "out" / "llm" / "eval")
    models = {r["config"]["model"] for r in recs}
    assert models == {"teacher_sft", "student_sft", "kd_fkl", "kd_rkl", "kd_ab"}
    assert len(recs) == 5 * len(TEST_SETS)
    sinst = [r for r in recs if r["config"]["test_set"] == "sinst"]
    assert all(r["metrics"]["n_examples"] == 1 for r in sinst)            # "hi" filtered out by the >= 11-token rule
    table = written[-1].read_text()
    assert "KD, ab (α=0.2, β=0.7)" in table and "published" in table
    assert (tmp_path / "out" / "llm" / "kd_ab" / "best" / "config.json").is_file()
