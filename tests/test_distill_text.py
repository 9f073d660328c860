"""`abkd distill text` end to end on tiny local GPT-2s (a teacher folder, a student config JSON or folder, a BPE
tokenizer trained here), through an argparse parser built as the `abkd` command builds it; then every refused input."""
import argparse, contextlib, io, json, os, re
from pathlib import Path

import pytest
import torch

import abkd.distill_text as dt
from abkd.llm.data import synthetic_instructions, synthetic_texts, train_bpe_tokenizer


def parser() -> argparse.ArgumentParser:
    "`abkd distill text` registered as the CLI registers `abkd distill images`."
    p = argparse.ArgumentParser(prog="abkd")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dist = sub.add_parser("distill")
    kinds = dist.add_subparsers(dest="kind", required=True, metavar="DATA")
    dt.add_text_parser(kinds)
    return p


def cli(argv):
    "(exit status, the `abkd: ...` lines of stderr, stdout) of `abkd ARGV`."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = dt.run_text(parser().parse_args(argv), argv)
        except SystemExit as e: code = e.code
    return code, [l for l in err.getvalue().splitlines() if re.match(r"abkd: (error|interrupted)", l)], out.getvalue()


def gpt2(tok, n_layer=1, vocab_size=None, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=512, vocab_size=vocab_size or len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    return cfg, GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    "train.jsonl / valid.jsonl (Dolly fields), a tokenizer, a teacher folder, student config JSONs and a student folder."
    root = tmp_path_factory.mktemp("zoo")
    recs = synthetic_instructions(26, seed=0)
    rows = [{"instruction": r["instruction"], "context": r["context"], "response": r["response"]} for r in recs]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (root / "valid.jsonl").write_text("".join(json.dumps({"instruction": r["instruction"], "input": r["context"],
                                                          "output": r["response"]}) + "\n" for r in rows[20:]))
    tok = train_bpe_tokenizer(synthetic_texts(recs), root / "tok", vocab_size=400)
    cfg, teacher = gpt2(tok, n_layer=2, seed=1)
    teacher.save_pretrained(root / "teacher"); tok.save_pretrained(root / "teacher")
    gpt2(tok)[0].to_json_file(root / "student.json")
    gpt2(tok, vocab_size=len(tok) + 24)[0].to_json_file(root / "student_wide.json")
    _, student = gpt2(tok, seed=2)
    student.save_pretrained(root / "student"); tok.save_pretrained(root / "student")
    for name, texts, size in (("added", synthetic_texts(recs), 300), ("other", [x.upper() for x in synthetic_texts(recs)], 400)):
        tk = train_bpe_tokenizer(texts, root / f"tok_{name}", vocab_size=size)
        _, s = gpt2(tk, seed=2)
        s.save_pretrained(root / f"student_{name}_tok"); tk.save_pretrained(root / f"student_{name}_tok")
    return root


def base(zoo, out, student="student.json", *extra):
    return ["distill", "text", "--teacher", str(zoo / "teacher"), "--student", str(zoo / student), "--data",
            str(zoo / "train.jsonl"), "--valid", str(zoo / "valid.jsonl"), "--batch-size", "4", "--lr", "1e-2",
            "--out", str(out), *extra]


def finished(out: Path) -> dict:
    "The record of a finished run, after checking the files it wrote."
    assert {p.name for p in out.iterdir()} == {"setup.json", "record.json", "table.md", "student"}
    rec = json.loads((out / "record.json").read_text())
    assert rec["experiment"] == "distill_text" and rec["provenance"]["git"]["sha"] and rec["provenance"]["hardware"]["cpu_count"]
    table = (out / "table.md").read_text()
    for row in ("eval KD loss", "student perplexity", "top-1 agreement", "optimizer steps", "wall time"): assert row in table
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoTokenizer.from_pretrained(out / "student"); AutoModelForCausalLM.from_pretrained(out / "student")
    return rec


def test_help_shows_a_complete_example():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e: parser().parse_args(["distill", "text", "--help"])
    assert e.value.code == 0
    text = out.getvalue()
    assert "abkd distill text --teacher" in text and "--out runs/distilled" in text and "--vocab-policy" in text


def test_max_steps_end_to_end_then_skipped(zoo, tmp_path):
    argv = base(zoo, tmp_path / "out", "student.json", "--max-steps", "6")
    code, errors, out = cli(argv)
    assert (code, errors) == (0, [])
    m = finished(tmp_path / "out")["metrics"]
    assert m["steps"] == 6 and m["after"]["eval_kd_loss"] < m["before"]["eval_kd_loss"]
    assert m["before"]["eval_loss_tokens"] == m["after"]["eval_loss_tokens"] > 0
    code, errors, again = cli(argv)                                      # the same command: skipped
    assert (code, errors) == (0, []) and "skipping" in again


def test_epochs_and_lora(zoo, tmp_path):
    code, errors, _ = cli(base(zoo, tmp_path / "ep", "student", "--epochs", "2"))
    assert (code, errors) == (0, [])
    assert finished(tmp_path / "ep")["metrics"]["steps"] == 10                # 20 examples / 4 × 2 epochs
    code, errors, _ = cli(base(zoo, tmp_path / "lora", "student", "--max-steps", "3", "--lora", "4"))
    assert (code, errors) == (0, [])
    rec = finished(tmp_path / "lora")
    assert rec["config"]["lora"] == 4 and rec["metrics"]["steps"] == 3
    from transformers import AutoModelForCausalLM                           # merged: changed weights, no adapter left
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "student")
    start = AutoModelForCausalLM.from_pretrained(zoo / "student")
    assert not any("lora" in k for k in saved.state_dict())
    assert not torch.equal(saved.transformer.h[0].attn.c_attn.weight, start.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(saved.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)


def test_fused_matches_the_logits_path(zoo, tmp_path):
    """The fused loss trains the same student as the logits path (same data order and seed): equal eval metrics;
    with --bf16 (autocast) too, within bfloat16's precision."""
    runs = {}
    for name, extra in (("logits", []), ("fused", ["--fused"])):
        code, errors, _ = cli(base(zoo, tmp_path / name, "student.json", "--max-steps", "3", *extra))
        assert (code, errors) == (0, [])
        runs[name] = finished(tmp_path / name)["metrics"]["after"]
    assert runs["fused"]["eval_kd_loss"] == pytest.approx(runs["logits"]["eval_kd_loss"], rel=1e-3)
    code, errors, _ = cli(base(zoo, tmp_path / "bf16", "student.json", "--max-steps", "3", "--fused", "--bf16", "--cpu"))
    assert (code, errors) == (0, [])
    rec = finished(tmp_path / "bf16")
    assert rec["config"]["bf16"] and rec["metrics"]["after"]["eval_kd_loss"] == pytest.approx(runs["logits"]["eval_kd_loss"], rel=0.1)


def test_vocab_policy_pad(zoo, tmp_path):
    code, errors, _ = cli(base(zoo, tmp_path / "wide", "student_wide.json"))
    assert code == 2 and "vocabulary has 400 tokens and the student's 424" in errors[0] and "--vocab-policy" in errors[0]
    assert not (tmp_path / "wide").exists()
    code, errors, _ = cli(base(zoo, tmp_path / "wide", "student_wide.json", "--max-steps", "2", "--vocab-policy", "pad"))
    assert (code, errors) == (0, [])
    finished(tmp_path / "wide")


def refused(argv, out: Path, *expected: str):
    code, errors, _ = cli(argv)
    assert code == 2 and len(errors) == 1, (code, errors)
    for e in expected: assert e in errors[0], (e, errors[0])
    assert not out.exists(), "a refused run left an output folder"
    return errors[0]


def test_missing_and_malformed_files(zoo, tmp_path):
    out = tmp_path / "never"
    refused(base(zoo, out)[:6] + ["--data", str(zoo / "nope.jsonl"), "--out", str(out)], out, "--data", "nope.jsonl",
            "no such file", "instruction")
    refused(base(zoo, out, "nothing"), out, "--student", "nothing", "not found")
    refused(base(zoo, out, "nothing.json"), out, "--student", "nothing.json", "no such config file")
    refused(base(zoo, out, "student.json", "--loss", "fkl", "--alpha", "0.5"), out, "--alpha", "--loss fkl", "--loss-param")
    refused(base(zoo, out, "student.json", "--loss", "fkl", "--fused"), out, "--fused", "--loss ab", "--alpha 1 --beta 0")
    refused(base(zoo, out, "student.json", "--loss", "nope"), out, "unknown loss 'nope'", "fkl")
    lines = (zoo / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:4] + ['{"instruction": "x", "context": ""}'] + lines[4:]) + "\n")
    refused(base(zoo, out)[:6] + ["--data", str(bad), "--out", str(out)], out, "bad.jsonl, line 5", "missing field 'output'")
    bad.write_text("\n".join(lines[:2] + ["{not json"]) + "\n")
    refused(base(zoo, out)[:6] + ["--data", str(bad), "--out", str(out)], out, "bad.jsonl, line 3", "not valid JSON")


def test_tokenizers_that_do_not_match(zoo, tmp_path):
    out = tmp_path / "never"
    refused(base(zoo, out, "student_other_tok"), out, "tokenizers do not match", "has 400 tokens", "student's",
            "id ", "tokenizer.save_pretrained", "token mapping")
    refused(base(zoo, out, "student_added_tok"), out, "tokenizers do not match", "has 400 tokens", "student's",
            "300", "--vocab-policy truncate or pad")
    code, errors, _ = cli(base(zoo, out, "student_added_tok", "--max-steps", "2", "--vocab-policy", "pad"))
    assert (code, errors) == (0, [])
    assert finished(out)["config"]["run"]["tokenizer_tokens"] == 300          # the data read with the smaller one


def test_teacher_that_does_not_fit(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "available_memory", lambda device: (100_000, "available RAM"))
    out = tmp_path / "never"
    loaded = []
    monkeypatch.setattr(dt, "load_models", lambda *a: loaded.append(a))
    msg = refused(base(zoo, out), out, "--teacher", "does not fit", "parameters", "available RAM")
    from transformers import AutoConfig
    n = dt.parameter_count(AutoConfig.from_pretrained(zoo / "teacher"))
    assert f"{n:,} parameters" in msg and not loaded                        # refused before loading


def test_out_folder_of_another_run_then_interrupt_and_resume(zoo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = base(zoo, out, "student.json", "--max-steps", "4", "--save-steps", "2")
    from abkd.integrations.transformers import ABKDTrainer
    real = ABKDTrainer.compute_loss
    def interrupt_at_3(self, *a, **k):
        if self.state.global_step == 3: raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(ABKDTrainer, "compute_loss", interrupt_at_3)
    code, errors, _ = cli(argv)
    assert code == 130 and "checkpoint-2" in errors[0] and "abkd distill text" in errors[0]
    monkeypatch.setattr(ABKDTrainer, "compute_loss", real)
    before = sorted(p.name for p in out.iterdir())
    msg = refused(base(zoo, out, "student.json", "--max-steps", "5"), tmp_path / "absent", "holds a run of other settings",
                  "max_steps 4 there, 5 now")
    assert sorted(p.name for p in out.iterdir()) == before                   # the other run is left as it was
    code, errors, printed = cli(argv)                                        # the same command resumes
    assert (code, errors) == (0, []) and "resuming" in printed and "checkpoint-2" in printed
    rec = finished(out)
    assert rec["metrics"]["steps"] == 4 and rec["config"]["run"]["resumed_from"] == "checkpoint-2"
