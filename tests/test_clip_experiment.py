"""Tests of `abkd.clip.experiment`: a short smoke run end to end and the paper path with released teacher prompts."""
import pytest
import torch
from abkd.clip.data import STANDIN_WORDS, write_standin_dataset
from abkd.clip.models import (PromptConfig, PromptedCLIP, PromptKDStudent, TeacherPromptsNotFoundError, load_clip, tiny_clip_config, word_tokenizer)


TOK_WORDS = ["a", "photo", "of"] + STANDIN_WORDS


def test_short_smoke_run(tmp_path):
    from abkd.clip.experiment import SMOKE, reproduce_smoke
    from abkd.results import load_records, paper_number
    quick = dict(SMOKE, datasets=("caltech101",), n_classes=4, n_train=3, n_test=2, shots=2, pretrain_epochs=1,
                 teacher_epochs=2, epochs=2, methods=("kd", "abkd", "fkl_at_abkd_weights"), seeds=(1,))
    written = reproduce_smoke(tmp_path, quick, progress=False)
    recs = load_records(tmp_path / "clip" / "records")
    names = [r["config"]["recipe_name"] for r in recs]
    assert sorted(names) == ["abkd", "fkl_at_abkd_weights", "kd"]
    assert all(set(r["metrics"]) >= {"base", "new", "hm", "teacher_hm"} for r in recs)
    # every record states its weights, temperature and scaling
    assert all({"ce_weight", "kd_weight", "temperature", "scaling", "t_squared"} <= set(r["config"]["recipe"]) for r in recs)
    table = written[-1].read_text()
    assert "| Caltech101 | ABKD (n=1) | CE 0, λ=1000, T=1, α=0.8, β=0.2, ÷B |" in table
    assert "| Caltech101 | KD (PromptKD) (n=1) | CE 0, λ=1000, T=1, ÷B·C·T² |" in table
    control = recs[names.index("fkl_at_abkd_weights")]["config"]
    assert control["method"] == "abkd" and (control["loss_params"]["alpha"], control["loss_params"]["beta"]) == (1.0, 0.0)
    assert control["kd_weight"] == recs[names.index("abkd")]["config"]["kd_weight"]
    assert "| Caltech101 | FKL at ABKD's weights (control) (n=1) | CE 0, λ=1000, T=1, α=1, β=0, ÷B |" in table
    # Table 16 beside ours and the difference, for every row with a Table 16 row, the teacher's included
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| Caltech101 |")}
    m = {n: r["metrics"] for n, r in zip(names, recs)}
    t = m["kd"]
    for label, ours, paper_row in (("Teacher (prompted)", dict(base=t["teacher_base"], new=t["teacher_new"], hm=t["teacher_hm"]), "Teacher"),
                                   ("KD (PromptKD) (n=1)", m["kd"], "KD"), ("ABKD (n=1)", m["abkd"], "ABKD")):
        for key, col in (("base", "Base"), ("new", "Novel"), ("hm", "HM")):
            paper = paper_number(16, paper_row, col, "Caltech101")
            assert f"| {ours[key]:.2f} | {paper:.2f} | {ours[key] - paper:+.2f} |" in rows[label], (label, key)
    assert rows["FKL at ABKD's weights (control) (n=1)"].count("not in Table 16") == 3
    assert "FKL at ABKD's weights is ab(1, 0)" in table and "Weights — KD (PromptKD): CE 0" in table
    assert all(r["config"]["recipe"]["source"] and r["config"]["selection"] == "last epoch" for r in recs)
    # the figure is written beside the table, from the same records: bars = base/new/HM of each method
    from abkd.clip.experiment import FIGURE, base_new_figure
    fig_path = tmp_path / "clip" / FIGURE
    assert fig_path in written and fig_path.read_bytes()[:4] == b"\x89PNG"
    heights = sorted(round(float(p.get_height()), 9) for p in base_new_figure(recs).axes[0].patches)
    assert heights == sorted(round(r["metrics"][k], 9) for r in recs for k in ("base", "new", "hm"))


def test_presets_read_the_paper_and_refuse_unknown_names():
    from abkd.clip.experiment import METHODS, method_config, method_recipe
    from abkd.results import paper_hyperparameters, training_fact
    assert method_config("oxford_pets", "abkd", 1).loss_params == dict(alpha=0.8, beta=0.4, temperature=1.0)
    assert (method_config("fgvc_aircraft", "ablsd", 1).loss_params["alpha"],
            method_config("fgvc_aircraft", "ablsd", 1).loss_params["beta"]) == paper_hyperparameters(6, "FGVCAircraft")
    assert method_config("imagenet", "ttm", 1).lr == training_fact("base_to_new", "lr") == 0.005
    assert method_config("dtd", "dkd", 1).loss_params == dict(temperature=1.0, tckd_weight=1.0, nckd_weight=1.0, warmup=0.0)
    assert method_recipe("dtd", "kd", 300.0)["kd_weight_source"].startswith("chosen on base-class validation")
    assert set(METHODS) == {"kd", "abkd", "dkd", "abdkd", "lsd", "ablsd", "ttm", "abttm", "fkl_at_abkd_weights"}
    from abkd.clip.data import DATASETS
    for ds in DATASETS:     # the control: ABKD's recipe (λ, T, scaling, lr) at ab(1, 0)
        ab, ctrl = method_recipe(ds, "abkd"), method_recipe(ds, "fkl_at_abkd_weights")
        assert ctrl["loss_params"] == dict(ab["loss_params"], alpha=1.0, beta=0.0)
        assert {k: ctrl[k] for k in ("loss", "kd_weight", "temperature", "scaling", "t_squared", "ce_weight")} == \
            {k: ab[k] for k in ("loss", "kd_weight", "temperature", "scaling", "t_squared", "ce_weight")}
        c = method_config(ds, "fkl_at_abkd_weights", 1)
        assert c.name == "fkl_at_abkd_weights" and c.weight == method_config(ds, "abkd", 1).weight and c.amp is False
    assert method_config("dtd", "dkd", 1).labels == "teacher"                 # the paper: unlabeled training images
    with pytest.raises(ValueError, match="unknown method 'crd'; choose from kd, abkd, dkd"):
        method_config("dtd", "crd", 1)
    with pytest.raises(KeyError, match="unknown dataset 'mnist'; known: imagenet, caltech101"):
        method_config("mnist", "abkd", 1)


def test_paper_path_with_released_teacher_prompts(tmp_path):
    "reproduce_paper end to end on a stand-in, with the teacher's prompts read from a file in PromptKD's release layout."
    from abkd.clip.experiment import reproduce_paper
    from abkd.results import load_records
    write_standin_dataset(tmp_path / "data", "dtd", n_classes=4, n_train=3, n_val=1, n_test=2, image_size=32)
    tok, pc = word_tokenizer(TOK_WORDS), PromptConfig(depth_text=2, depth_vision=2)
    def models(classnames):
        torch.manual_seed(0)
        teacher = PromptedCLIP(load_clip(tiny_clip_config(width=48, projection_dim=48)), tok, classnames, pc)
        student_clip = load_clip(tiny_clip_config())
        return teacher, lambda: PromptKDStudent(PromptedCLIP(student_clip, tok, classnames, pc), teacher_dim=48)
    sd = {"prompt_learner.ctx": torch.randn(4, 48), "image_encoder.VPT": torch.randn(4, 48),
          "text_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 48),
          "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 48)}
    path = tmp_path / "teachers" / "DescribableTextures" / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": sd}, path)
    with pytest.raises(TeacherPromptsNotFoundError):
        reproduce_paper(tmp_path / "out", tmp_path / "data", tmp_path / "nowhere", datasets=("dtd",), methods=("kd",),
                        seeds=(1,), models=models, epochs=2, image_size=32, progress=False)
    written = reproduce_paper(tmp_path / "out", tmp_path / "data", tmp_path / "teachers", datasets=("dtd",),
                              methods=("abttm", "fkl_at_abkd_weights"), seeds=(1,), models=models, epochs=2,
                              image_size=32, progress=False, kd_weight_grid=(100, 3000))
    recs = sorted(load_records(tmp_path / "out" / "clip" / "records"), key=lambda r: r["config"]["recipe_name"])
    control = recs.pop(1)
    # the control runs at ABKD's λ, chosen on validation for ABKD (its selection runs are ABKD's)
    abkd_scores = {float(k): v for k, v in control["config"]["kd_weight_scores"].items()}
    assert control["config"]["kd_weight_from"] == "abkd"
    assert control["config"]["kd_weight"] == max(abkd_scores, key=lambda w: (abkd_scores[w], -w))
    assert len(load_records(tmp_path / "out" / "clip" / "selection" / "dtd" / "abkd")) == 2
    assert not (tmp_path / "out" / "clip" / "selection" / "dtd" / "fkl_at_abkd_weights").exists()
    assert len(recs) == 1 and recs[0]["config"]["scale"] == "paper" and recs[0]["config"]["method"] == "abttm"
    # λ chosen on base-class validation from the grid: the best score, its scores stored in the record
    scores = {float(k): v for k, v in recs[0]["config"]["kd_weight_scores"].items()}
    assert set(scores) == {100.0, 3000.0} and recs[0]["config"]["kd_weight"] == max(scores, key=lambda w: (scores[w], -w))
    assert len(load_records(tmp_path / "out" / "clip" / "selection" / "dtd" / "abttm")) == 2
    assert "| DTD | ABTTM (n=1) |" in written[-1].read_text() and "not in Table 16" in written[-1].read_text()
    with pytest.raises(ValueError, match="kd_weight must be 'select', 'official' or a number"):
        reproduce_paper(tmp_path / "out", tmp_path / "data", tmp_path / "teachers", datasets=("dtd",), kd_weight="best",
                        models=models)



def test_run_method_names_its_progress(monkeypatch, tmp_path):
    "Progress inside a run carries '<dataset> <method> seed <k>'."
    import abkd.clip.experiment as E
    from abkd.training import current_run
    seen = []
    class Stop(Exception): pass
    def fit_clip(*a, **k): seen.append(current_run()); raise Stop
    monkeypatch.setattr(E, "fit_clip", fit_clip)
    cfg = E.method_config("dtd", "abkd", 2)
    with pytest.raises(Stop): E.run_method(cfg, lambda: None, None, None, tmp_path)
    assert seen == [f"dtd {cfg.name} seed 2"]
