"""Tests of `abkd.clip.experiment`: a short smoke run end to end and the paper path with released teacher prompts."""
import pytest
import torch
from abkd.clip.data import STANDIN_WORDS, write_standin_dataset
from abkd.clip.models import (PromptConfig, PromptedCLIP, PromptKDStudent, TeacherPromptsNotFoundError, load_clip, tiny_clip_config, word_tokenizer)


TOK_WORDS = ["a", "photo", "of"] + STANDIN_WORDS


def test_short_smoke_run(tmp_path):
    from abkd.clip.experiment import SMOKE, reproduce_smoke
    from abkd.results import load_records
    quick = dict(SMOKE, datasets=("caltech101",), n_classes=4, n_train=3, n_test=2, shots=2, pretrain_epochs=1,
                 teacher_epochs=2, epochs=2, methods=("kd", "abkd"), seeds=(1,))
    written = reproduce_smoke(tmp_path, quick, progress=False)
    recs = load_records(tmp_path / "clip" / "records")
    assert len(recs) == 2 and {r["config"]["method"] for r in recs} == {"kd", "abkd"}
    assert all(set(r["metrics"]) >= {"base", "new", "hm", "teacher_hm"} for r in recs)
    table = written[-1].read_text()
    assert "| Caltech101 | ABKD (n=1) |" in table and "published PromptKD" in table
    assert "98.91" in table and "paper value not recorded" in table


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
                              methods=("abttm",), seeds=(1,), models=models, epochs=2, image_size=32, progress=False)
    recs = load_records(tmp_path / "out" / "clip" / "records")
    assert len(recs) == 1 and recs[0]["config"]["scale"] == "paper" and recs[0]["config"]["method"] == "abttm"
    assert "| DTD | ABTTM (n=1) |" in written[-1].read_text()

