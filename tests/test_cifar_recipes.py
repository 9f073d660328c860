"""Tests of `abkd.cifar.recipes`: the paper's α, β for every setting of Tables 4 and 13 (against published.json and,
independently, the committed transcription of the paper), each method's weights and temperature, the controls and
variants, bad input, and the teacher registry with its checkpoint checks."""
import re
from pathlib import Path
import pytest
import torch
from torch import nn
import abkd.cifar.experiment as E
from abkd.cifar.models import MODELS, create_model
from abkd.cifar.recipes import (
    AB_GRID, AB_NAMES, ALL_METHODS, ALL_PAIRS, CONFLICTS, CONTROLS, METHODS, PAIRS, PARENT, TEACHER_SIZE_PAIRS,
    VARIANTS, conflicts_markdown, load_state_dict_file, method_config, method_params, methods_for, paper_schedule,
    presets_markdown, recipe, teacher_path, teacher_registry)
from abkd.cifar.train import make_loss
from abkd.results import pair_label, paper_hyperparameters, paper_settings, training_fact, training_facts

TRANSCRIPTION = Path(__file__).parent / "data" / "paper_tables.md"
SHORT = {"W40-2": "wrn_40_2", "W16-2": "wrn_16_2", "W40-1": "wrn_40_1", "r32x4": "resnet32x4", "r8x4": "resnet8x4"}


def _model(short: str) -> str:
    "A model name from the transcription's column heading (W40-2, r110, vgg13, ...)."
    return SHORT.get(short, "resnet" + short[1:] if re.fullmatch(r"r\d+", short) else short)


def transcribed_table4() -> dict:
    "(teacher, student, 'ABKD'...) → (α, β), parsed from the committed transcription of the paper's Table 4."
    text = TRANSCRIPTION.read_text()
    heads = re.search(r"^## Table 4 .*pairs: (.*)$", text, re.M).group(1).split(", ")
    pairs = [tuple(_model(x) for x in h.split(">")) for h in heads]
    out = {}
    for method, cells in re.findall(r"^(AB\w+)\s*: (.*)$", text, re.M):
        values = re.findall(r"\(([-\d.]+),([-\d.]+)\)", cells)
        assert len(values) == len(pairs) == 8
        for (t, s), (a, b) in zip(pairs, values): out[t, s, method] = (float(a), float(b))
    return out


def transcribed_table13() -> tuple:
    "(teachers, (α, β)) of the transcription's Table 13."
    text = TRANSCRIPTION.read_text()
    a, b = re.search(r"^## Table 13 .*alpha=([\d.]+) beta=([\d.]+)", text, re.M).groups()
    block = text.split("## Table 13", 1)[1].split("\n## ", 1)[0]
    teachers = re.findall(r"^(resnet\d+) \d", block, re.M)
    return teachers, (float(a), float(b))


def test_every_table4_setting_equals_the_paper_and_the_transcription():
    ref = transcribed_table4()
    assert len(ref) == 32
    for (t, s, name), ab in ref.items():
        assert paper_hyperparameters(4, pair_label(t, s), name) == ab
        method = name.lower()
        for m in (method,) + {"abkd": ("abkd_official",), "abdkd": ("abdkd_ab_tckd",)}.get(method, ()):
            c = method_config(m, t, s)
            assert (c["alpha"], c["beta"]) == ab, (m, t, s)
            assert (c["loss_params"]["alpha"], c["loss_params"]["beta"]) == ab
            assert method_params(m, t, s)["alpha"] == ab[0] and recipe(t, s, m).loss_params["beta"] == ab[1]
            assert "Table 4" in c["source"]


def test_every_table13_setting_equals_the_paper_and_the_transcription():
    teachers, ab = transcribed_table13()
    assert teachers == ["resnet32", "resnet44", "resnet56", "resnet110"] and ab == (0.8, 0.3)
    assert [t for t, _ in TEACHER_SIZE_PAIRS] == teachers and all(s == "resnet20" for _, s in TEACHER_SIZE_PAIRS)
    for t in teachers:
        assert paper_hyperparameters(13, pair_label(t, "resnet20")) == ab
        c = method_config("abkd", t, "resnet20")
        assert (c["alpha"], c["beta"]) == ab and "Table 13" in c["source"]
        assert method_params("abkd", t, "resnet20")["alpha"] == ab[0] and recipe(t, "resnet20", "abkd").loss_params["beta"] == ab[1]
        assert set(methods_for(t, "resnet20")) >= {"kd", "abkd", *CONTROLS}
        # the columns FKLD and RKLD: KL at the KD recipe (no α, β) and ab(0, 1) at ABKD's weights
        assert "alpha" not in method_params("kd", t, "resnet20")
        rkl = recipe(t, "resnet20", "rkl_at_abkd_weights").loss_params
        assert (rkl["alpha"], rkl["beta"]) == (0.0, 1.0) and rkl["kd_weight"] == c["kd_weight"]


def test_pairs_are_the_papers_and_exist_in_the_model_zoo():
    table4 = list(dict.fromkeys((t, s) for t, s, _ in transcribed_table4()))
    assert list(PAIRS) == table4 + [("ResNet50", "vgg8")]
    assert len(ALL_PAIRS) == 11 and {p for p in TEACHER_SIZE_PAIRS} <= set(ALL_PAIRS)
    assert {m for p in ALL_PAIRS for m in p} <= set(MODELS)
    assert len(METHODS) == 8 and set(ALL_METHODS) == set(METHODS) | set(CONTROLS) | set(VARIANTS)


def test_resnet50_vgg8_uses_the_same_students_table4_setting_and_says_so():
    ref = transcribed_table4()
    for m, name in AB_NAMES.items():
        c = method_config(m, "ResNet50", "vgg8")
        assert (c["alpha"], c["beta"]) == ref["vgg13", "vgg8", name]
        assert "Table 14" in c["source"] and "vgg13 → vgg8" in c["source"]
        assert (method_params(m, "ResNet50", "vgg8")["alpha"], recipe("ResNet50", "vgg8", m).loss_params["beta"]) == \
            ref["vgg13", "vgg8", name]
    assert set(methods_for("ResNet50", "vgg8")) >= set(METHODS)          # every column of Table 14 has a preset


def test_recipes_train_in_float32_as_the_official_scripts():
    "The official standard_classification has no autocast: recipe() and teacher_recipe() set amp=False, stated in the source."
    for t, s in ALL_PAIRS:
        for m in methods_for(t, s):
            cfg = recipe(t, s, m)
            assert cfg.amp is False and "float32" in cfg.recipe_source
    from abkd.cifar.recipes import teacher_recipe
    assert teacher_recipe("resnet32").amp is False and recipe("resnet56", "resnet20", "abkd", amp=True).amp is True
    topics = {c["topic"] for c in CONFLICTS}
    assert {"numeric precision", "DKD warm-up clock", "last partial batch", "Table 13 teachers resnet32, resnet44",
            "TTM λ per pair", "ABKD weight λ", "ABDKD target-class term (ab_tckd)"} <= topics
    assert all(c["paper"] and c["official"] and c["follow"] and c["why"] for c in CONFLICTS)


def test_abkd_weights_temperature_and_the_official_variant():
    facts = training_facts("cifar100")
    lam, lam_official, T = facts["kd_weight"]["value"], facts["kd_weight"]["official"]["value"], facts["temperature"]["value"]
    assert (lam, lam_official, T, facts["t_squared"]["value"]) == (32, 64, 4, False)
    for t, s in ALL_PAIRS:
        c = method_config("abkd", t, s)
        assert (c["loss"], c["ce_weight"], c["temperature"]) == ("abkd", 1.0, 4.0)
        assert c["kd_weight"] == lam / T ** 2 == 2.0 and c["divergence_weight"] == lam   # λ·D_AB, no T²
        o = method_config("abkd_official", t, s)
        assert o["divergence_weight"] == lam_official and (o["alpha"], o["beta"]) == (c["alpha"], c["beta"])
        assert "App. I.2.3" in c["source"] and "script header" in o["source"]
    # the objective: kd_weight·T²·D_AB = 32·D_AB(softmax(s/T) ‖ softmax(t/T)), computed here in float64
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(5, 100, generator=g, dtype=torch.float64), 3 * torch.randn(5, 100, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 100, (5,), generator=g)
    c = method_config("abkd", "resnet32x4", "resnet8x4")
    a, b = c["alpha"], c["beta"]
    p, q = torch.softmax(t_logits / T, -1), torch.softmax(s_logits / T, -1)
    d = -(p ** a * q ** b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)
    want = torch.nn.functional.cross_entropy(s_logits, labels) + 32 * d.mean()
    got = make_loss(recipe("resnet32x4", "resnet8x4", "abkd")).total(s_logits, t_logits, labels)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_controls_are_abkds_recipe_at_fkl_and_rkl():
    for t, s in ALL_PAIRS:
        ab = method_config("abkd", t, s)["loss_params"]
        for ctrl, point in (("fkl_at_abkd_weights", (1.0, 0.0)), ("rkl_at_abkd_weights", (0.0, 1.0))):
            c = method_config(ctrl, t, s)
            assert c["loss"] == "abkd" and (c["alpha"], c["beta"]) == point
            assert {k: v for k, v in c["loss_params"].items() if k not in ("alpha", "beta")} == \
                {k: v for k, v in ab.items() if k not in ("alpha", "beta")}
    with pytest.raises(ValueError, match="no free"):
        method_params("fkl_at_abkd_weights", "vgg13", "vgg8", (0.5, 0.5))


def test_baselines_and_ab_versions_change_only_alpha_beta():
    kd = method_config("kd", "vgg13", "vgg8")
    assert (kd["ce_weight"], kd["kd_weight"], kd["temperature"], kd["divergence_weight"]) == (0.1, 0.9, 4.0, 0.9 * 16)
    ls, als = method_config("lsd", "vgg13", "vgg8"), method_config("ablsd", "vgg13", "vgg8")
    ablsd_facts = tuple(training_fact("cifar100_ablsd", k) for k in ("ce_weight", "kd_weight", "temperature"))
    assert (als["ce_weight"], als["kd_weight"], als["temperature"]) == ablsd_facts == (0.1, 9, 2)
    assert (ls["ce_weight"], ls["kd_weight"], ls["temperature"]) == ablsd_facts
    for m, parent in PARENT.items():
        for t, s in PAIRS:
            child, par = method_params(m, t, s), method_params(parent, t, s)
            assert {k: v for k, v in child.items() if k not in ("alpha", "beta", "ab_tckd")} == par, (m, t, s)
    assert method_params("abdkd", "resnet56", "resnet20")["ab_tckd"] is False          # the official code's TCKD
    assert method_params("abdkd_ab_tckd", "resnet56", "resnet20")["ab_tckd"] is True
    assert method_params("dkd", "resnet56", "resnet20")["nckd_weight"] == 2.0
    assert method_params("dkd", "resnet32x4", "resnet8x4")["nckd_weight"] == 8.0
    assert method_params("dkd", "vgg13", "vgg8")["nckd_weight"] == 6.0
    assert method_params("ttm", "wrn_40_2", "wrn_40_1")["kd_weight"] == 76.0        # the official script header
    assert method_params("ttm", "vgg13", "vgg8")["kd_weight"] == 45.0
    assert "unverified" in method_config("ttm", "resnet56", "resnet20")["source"]
    assert method_params("abttm", "vgg13", "vgg8", (0.9, 0.5))["alpha"] == 0.9          # a grid point overrides


def test_every_preset_states_weights_temperature_source_and_builds():
    sched = paper_schedule()
    assert sched == dict(epochs=240, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, lr_decay=0.1,
                         milestones=(150, 180, 210))
    n = 0
    for t, s in ALL_PAIRS:
        for m in methods_for(t, s):
            c = method_config(m, t, s)
            assert {"ce_weight", "kd_weight"} <= set(c["loss_params"]) and c["source"]
            assert ("temperature" in c["loss_params"]) == c["t_squared"] == (c["loss"] not in ("ttm", "abttm"))
            cfg = recipe(t, s, m, seed=3)
            assert {k: getattr(cfg, k) for k in sched} == sched and cfg.seed == 3 and cfg.teacher == t
            loss = make_loss(cfg)
            assert (loss.ce_weight, loss.kd_weight) == (c["ce_weight"], c["kd_weight"])
            n += 1
    assert n == 9 * 12 + 2 * 5
    assert all(point in AB_GRID for point in paper_settings(4).values())
    table = presets_markdown()
    assert table.count("\n") == n + 1 and "fkl_at_abkd_weights" in table
    assert len(CONFLICTS) >= 5 and "abkd_official" in conflicts_markdown() and "ab_tckd" in conflicts_markdown()


def test_bad_input_names_the_known_choices():
    with pytest.raises(ValueError, match="fkl_at_abkd_weights"):
        recipe("resnet56", "resnet20", "crd")
    with pytest.raises(ValueError, match="resnet110 → resnet44"):
        method_params("kd", "resnet56", "vgg8")
    with pytest.raises(ValueError, match="methods with a preset"):
        method_config("abdkd", "resnet32", "resnet20")
    with pytest.raises(ValueError, match="no free"):
        method_params("kd", "resnet56", "resnet20", (0.8, 0.3))
    with pytest.raises(ValueError, match="pair \\(alpha, beta\\)"):
        method_params("abkd", "resnet56", "resnet20", 0.8)
    with pytest.raises(ValueError, match="not a pair"):
        recipe("resnet8", "resnet8", "abkd", setting=("a", "b"))
    # a pair outside the paper runs only with a named paper pair's settings (or as a registered stand-in)
    c = method_config("abkd", "resnet8", "resnet8", setting=("resnet56", "resnet20"))
    assert (c["alpha"], c["beta"]) == (0.8, 0.3) and "settings of resnet56 → resnet20" in c["source"]
    assert method_config("abkd", "resnet20", "resnet8")["source"].startswith("resnet20 → resnet8 is not a paper pair")


def test_teacher_registry_and_checkpoint_checks(tmp_path):
    reg = teacher_registry()
    assert set(reg) == {"resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"}
    assert reg["resnet32x4"].published_acc == 79.42
    with pytest.raises(FileNotFoundError, match="cifar_teachers.tar"):
        teacher_path("resnet56", tmp_path)
    with pytest.raises(ValueError, match="Table 13.*71.93"):
        teacher_path("resnet32", tmp_path)
    f = tmp_path / reg["resnet56"].file
    f.parent.mkdir(parents=True)
    torch.save({"model": create_model("resnet56").state_dict()}, f)      # mdistiller's format
    assert teacher_path("resnet56", tmp_path) == f
    cfg = recipe("resnet56", "resnet20", "kd", teacher_checkpoint=str(f))
    assert isinstance(E.build_teacher(cfg), nn.Module)
    bad = recipe("resnet110", "resnet32", "kd", teacher_checkpoint=str(f))   # a resnet56 file for a resnet110
    with pytest.raises(ValueError, match="does not fit"):
        E.build_teacher(bad)
    f.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="sha256"):
        teacher_path("resnet56", tmp_path)
    with pytest.raises(ValueError, match="unreadable"):
        load_state_dict_file(f)
