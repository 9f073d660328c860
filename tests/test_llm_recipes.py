"""Tests of `abkd.llm.recipes`: the paper's α, β for every Table 7 setting (read from the committed transcription),
each method's trainer configuration, the protocol, the paper cell of each preset, bad inputs, the conflicts table and
the LoRA helper on a tiny LLaMA."""
import math

import pytest
import torch

from abkd.llm.recipes import (ALL_METHODS, CONFLICTS, LORA, METHODS, NOT_PROVIDED, STUDENTS, VARIANTS, apply_lora,
                              conflicts_markdown, init_recipe, method_config, method_params, paper_cell,
                              presets_markdown, protocol, recipe, teacher_recipe)
from abkd.llm.train import LLMTrainConfig
from abkd.losses import get_loss
from abkd.results import load_published, paper_number, paper_settings, paper_table, training_fact

GPT2 = ("gpt2", "gpt2-medium", "gpt2-large")


@pytest.mark.parametrize("student", GPT2)
def test_abkd_reads_every_table7_setting(student):
    settings = paper_settings(7)
    assert len(settings) == 5
    for keys, ab in settings.items():                   # one pair per test set in the transcription, the same each time
        assert method_params("abkd", student) == dict(alpha=ab[0], beta=ab[1])
        cfg = recipe(student, "abkd")
        assert (cfg.loss, cfg.loss_params, cfg.lm_weight) == ("ab", dict(alpha=ab[0], beta=ab[1]), 0.0)


def test_official_variant_reads_published_official_pair():
    (entry,) = load_published()["hyperparameters"]["table7"]["official_differs"]
    assert entry["applies_to"].endswith("GPT-2 (0.1B)")
    c = method_config("abkd_official_0.1b", "gpt2")
    assert (c["alpha"], c["beta"]) == tuple(entry["value"]) == (0, 1)
    assert entry["source"] in c["source"]


def test_openllama_follows_the_official_script_and_takes_an_override():
    assert method_params("abkd", "openllama2-3b") == dict(alpha=0.1, beta=0.8)
    assert method_params("abkd", "openllama2-3b", alpha_beta=(0.2, 0.7)) == dict(alpha=0.2, beta=0.7)
    c = method_config("abkd", "openllama2-3b")
    assert c["lora"]["r"] == 16 and c["lora"]["lora_alpha"] == 64 and c["lora"]["lora_dropout"] == 0.1
    assert "train_3B_7B_teacher_lora.sh" in c["source"]


# method → (mode, loss, loss params, student outputs, data)
EXPECTED = {
    "sft": ("sft", None, {}, None, "dolly"),
    "kd": ("kd", "fkl", {}, None, "dolly"),
    "rkl": ("kd", "rkl", {}, None, "dolly"),
    "seqkd": ("sft", None, {}, None, "teacher_outputs"),
    "gkd": ("kd", "js", {"beta": 0.9}, "mixed", "dolly"),
    "distillm": ("kd", "srkl", {"lam": 0.1}, "adaptive", "dolly"),
    "abkd": ("kd", "ab", {"alpha": 0.2, "beta": 0.7}, None, "dolly"),
    "abkd_official_0.1b": ("kd", "ab", {"alpha": 0.0, "beta": 1.0}, None, "dolly"),
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_method_config(method):
    c = method_config(method, "gpt2")
    mode, loss, params, gen, data = EXPECTED[method]
    assert (c["mode"], c["loss"], c["loss_params"], c["student_gen"], c["data"]) == (mode, loss, params, gen, data)
    assert c["lr_grid"] == training_fact("instruction_following", "lr_grid") == [5e-4, 1e-4, 5e-5]
    assert c["epochs"] == training_fact("instruction_following", "epochs") == 20
    assert (c["micro_batch_size"], c["grad_accum"], c["global_batch"]) == (8, 4, 32)
    assert (c["weight_decay"], c["warmup_steps"], c["max_grad_norm"], c["lm_weight"]) == (0.01, 0, 1.0, 0.0)
    assert c["source"] and c["lora"] is None
    cfg = recipe("gpt2", method)
    assert isinstance(cfg, LLMTrainConfig) and cfg.lr == 5e-4 and cfg.mode == mode and cfg.student_gen == gen
    if mode == "kd": get_loss(cfg.loss, **cfg.loss_params)        # the loss accepts the parameters
    assert recipe("gpt2", method, lr=5e-5).lr == 5e-5


def test_gkd_js_is_the_official_lambda():
    "Our js(β = 0.9) equals λ·KL(q‖m) + (1−λ)·KL(p‖m), m = (1−λ)p + λq, λ = 0.1 (the official js_distance), in float64."
    torch.manual_seed(0)
    s, t = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64) * 2
    q, p, lam = s.softmax(-1), t.softmax(-1), 0.1
    m = (1 - lam) * p + lam * q
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    official = lam * kl(q, m) + (1 - lam) * kl(p, m)
    ours = get_loss("js", reduction="none", **method_params("gkd"))(s, t)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-14)


def test_distillm_gen_and_lm_corpus_option():
    c = method_config("distillm")
    assert c["gen"] == dict(student_gen_ratio=1.0, student_gen_step=0.1, replay_size=1000)
    cfg = recipe("gpt2", "distillm")
    assert (cfg.student_gen_ratio, cfg.student_gen_step, cfg.replay_size) == (1.0, 0.1, 1000)
    assert recipe("gpt2", "gkd").student_gen_ratio == 0.5
    assert method_config("distillm", "openllama2-3b")["loss"] == "sfkl"          # the OpenLLaMA script's adaptive-sfkl
    on = method_config("abkd", lm_corpus=True)
    assert on["lm_weight"] == 1.0 and on["lm_corpus"] and recipe("gpt2", "kd", lm_corpus=True).lm_weight == 1.0


def test_protocol_teacher_and_init():
    p = protocol("gpt2")
    assert p["n_valid"][0] == p["select_examples"][0] == 1000 and p["select_no_repeat_ngram_size"][0] == 0
    assert p["test_seeds"][0] == [10, 20, 30, 40, 50] and p["max_len"][0] == 512 and p["max_prompt_len"][0] == 256
    t, i = teacher_recipe("gpt2"), init_recipe("gpt2-large")
    assert (t.mode, t.lr, t.weight_decay, t.epochs, t.micro_batch_size * t.grad_accum) == ("sft", 5e-5, 0.01, 10, 32)
    assert (i.mode, i.lr, i.weight_decay, i.epochs) == ("sft", 5e-4, 0.01, 3)
    assert teacher_recipe("gpt2", epochs=2, lr=1e-3).epochs == 2            # overrides win over the recipe
    llama = protocol("openllama2-3b")
    assert llama["lr_grid"][0] == (2.5e-4,) and llama["epochs"][0] == 10


def test_paper_cells_exist_in_the_transcription():
    for s in STUDENTS:
        for m in METHODS + tuple(v for v, st in VARIANTS.items() if st == s) + ("teacher",):
            cell = paper_cell(s, m)
            if "missing" in cell: continue
            row = paper_table(cell["table"], cell["part"])["rows"][cell["row"]]
            assert len(row) == 5
    assert paper_cell("gpt2", "abkd") == dict(table="2", part="GPT-2 (0.1B)", row="ABKD")
    assert paper_number(2, "ABKD", "Dolly", "GPT-2 Large (0.8B)") == 26.51
    assert paper_cell("gpt2", "rkl") == dict(table="3/10", part=None, row="RKLD")
    assert "reports RKLD only for GPT-2 (0.1B)" in paper_cell("gpt2-medium", "rkl")["missing"]
    assert "no teacher row" in paper_cell("openllama2-3b", "teacher")["missing"]
    assert paper_cell("openllama2-3b", "distillm")["row"] == "DISTILLM*"
    assert "reports no gkd row" in paper_cell("openllama2-3b", "gkd")["missing"]


@pytest.mark.parametrize("call, match", [
    (lambda: recipe("gpt3", "abkd"), "unknown student 'gpt3'; known students: gpt2, gpt2-medium, gpt2-large"),
    (lambda: recipe("gpt2", "kl"), "unknown method 'kl'; known methods: sft, kd, rkl, seqkd, gkd, distillm, abkd"),
    (lambda: method_config("minillm"), "not provided: MiniLLM optimises the sequence-level reverse KL"),
    (lambda: recipe("gpt2-large", "abkd_official_0.1b"), "official script of student 'gpt2' only"),
    (lambda: method_config("kd", alpha_beta=(0.2, 0.7)), "alpha_beta applies to the AB methods"),
    (lambda: method_config("abkd", alpha_beta=(0.2,)), "alpha_beta must be a pair"),
    (lambda: method_config("abkd", lr=-1), "lr must be a number > 0"),
    (lambda: method_config("sft", lm_corpus=True), "lm_corpus=True adds the OpenWebText LM term"),
    (lambda: paper_cell("gpt2", "minillm"), "not provided"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_conflicts_and_tables():
    topics = {c["topic"] for c in CONFLICTS}
    for t in ("GPT-2 (0.1B) α, β", "JS λ (GKD)", "Teacher SFT", "Batch", "Student initialisation",
              "Validation split and selection", "OpenWebText LM term", "MiniLLM"):
        assert t in topics
    assert all(c["paper"] and c["official"] and c["follow"] and c["why"] for c in CONFLICTS)
    assert conflicts_markdown().count("\n") == len(CONFLICTS) + 1
    table = presets_markdown()
    assert table.count("\n") == 1 + len(STUDENTS) * len(METHODS) + len(VARIANTS)
    assert "minillm" in NOT_PROVIDED


def test_apply_lora_on_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    h, layers = 8, 2
    base = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=h, intermediate_size=16, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2))
    assert sum(p.numel() for p in base.parameters()) < 2000
    ids = torch.randint(0, 16, (2, 5))
    before = base(ids).logits.detach().clone()
    model = apply_lora(base, method_config("abkd", "openllama2-3b"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == layers * 2 * LORA["r"] * (h + h)      # q_proj, v_proj: A [r, h] and B [h, r]
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert all("lora_" in n for n in trainable)
    torch.testing.assert_close(model(ids).logits, before)                   # B starts at zero: the base model's outputs
    lora_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(lora_layer.scaling["default"], LORA["lora_alpha"] / LORA["r"])
    with pytest.raises(ValueError, match="fine-tunes every weight"):
        apply_lora(base, method_config("abkd", "gpt2"))
