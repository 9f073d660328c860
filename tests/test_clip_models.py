"""Tests of `abkd.clip.models`: the deep-prompted CLIP and the PromptKD student on tiny configs, and the
teacher-prompt registry."""
import pytest
import torch
from abkd.clip.data import STANDIN_WORDS
from abkd.clip.models import (FeatureProjection, PromptConfig, PromptedCLIP, PromptKDStudent,
                              TeacherPromptsNotFoundError, class_prompts, encode_image, encode_text, load_clip,
                              load_teacher_prompts, projection_parameter_count, prompt_parameter_count,
                              teacher_prompt_path, tiny_clip_config, trainable_parameters, word_tokenizer)


TOK_WORDS = ["a", "photo", "of"] + STANDIN_WORDS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = word_tokenizer(TOK_WORDS)
    names = STANDIN_WORDS[:6]
    pc = PromptConfig(depth_text=2, depth_vision=3)
    teacher = PromptedCLIP(load_clip(tiny_clip_config(width=48, projection_dim=48)), tok, names, pc)
    student = PromptKDStudent(PromptedCLIP(load_clip(tiny_clip_config()), tok, names, pc), teacher_dim=48)
    return tok, names, pc, teacher, student


def test_prompt_learner_shapes_and_counts(tiny):
    _, names, pc, teacher, student = tiny
    assert teacher.text_ctx.shape == (2, 4, 48) and teacher.vision_ctx.shape == (3, 4, 48)
    got = {n: p.numel() for n, p in trainable_parameters(student)}
    assert got == {"prompted.vision_ctx": 3 * 4 * 32, "projection.0.weight": 32 * 48, "projection.0.bias": 48,
                   "projection.1.weight": 48, "projection.1.bias": 48, "projection.3.weight": 48 * 48,
                   "projection.3.bias": 48}
    assert not any(p.requires_grad for p in student.prompted.clip.parameters())
    assert not student.prompted.text_ctx.requires_grad
    g = teacher.text_features()
    assert g.shape == (6, 48) and torch.allclose(g.norm(dim=-1), torch.ones(6))
    assert student(torch.randn(3, 3, 32, 32), g).shape == (3, 6)


def test_paper_size_counts_from_configs():
    "Prompt and projection sizes of ViT-B/16 and ViT-L/14 built from their published widths (random weights)."
    assert prompt_parameter_count(PromptConfig(), 512, 768)["vision"] == 27648
    assert projection_parameter_count(512, 768) == sum(p.numel() for p in FeatureProjection(512, 768).parameters())


def test_encoders_without_prompts_match_transformers(tiny):
    tok, names, _, teacher, _ = tiny
    clip = teacher.clip
    pr = class_prompts(tok, names, n_ctx=0, ctx_init="")
    mask = (torch.arange(pr.input_ids.shape[1]) <= pr.eot_positions[:, None]).long()
    pooled = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output   # transformers 4.x / 5
    ref = pooled(clip.get_text_features(input_ids=pr.input_ids, attention_mask=mask))
    torch.testing.assert_close(encode_text(clip, pr), ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encode_image(clip, x), pooled(clip.get_image_features(pixel_values=x)),
                               rtol=1e-5, atol=1e-5)


def test_deep_prompts_change_every_prompted_layer(tiny):
    "Perturbing the prompt of any prompted layer (here the last of both branches) changes the features."
    _, _, _, teacher, _ = tiny
    x = torch.randn(2, 3, 32, 32)
    noise = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f0, g0 = teacher.image_features(x).clone(), teacher.text_features().clone()
        for ctx, layer in ((teacher.vision_ctx, 2), (teacher.text_ctx, 1)):
            ctx[layer] += noise
        f1, g1 = teacher.image_features(x).clone(), teacher.text_features().clone()
        for ctx, layer in ((teacher.vision_ctx, 2), (teacher.text_ctx, 1)):
            ctx[layer] -= noise
    assert (f0 - f1).abs().max() > 1e-3 and (g0 - g1).abs().max() > 1e-3


def test_student_rejects_student_text_features(tiny):
    _, _, _, _, student = tiny
    with pytest.raises(ValueError, match="teacher's text features"):
        student(torch.randn(1, 3, 32, 32), torch.randn(6, 32))


def test_teacher_prompt_registry(tmp_path, tiny):
    _, _, pc, teacher, _ = tiny
    with pytest.raises(TeacherPromptsNotFoundError, match="train them with"):
        teacher_prompt_path(tmp_path, "EuroSAT")
    sd = {"prompt_learner.ctx": torch.randn(4, 48), "image_encoder.VPT": torch.randn(4, 48)}
    sd.update({f"text_encoder.transformer.resblocks.{l}.VPT_shallow": torch.randn(4, 48) for l in (1,)})
    sd.update({f"image_encoder.transformer.resblocks.{l}.VPT_shallow": torch.randn(4, 48) for l in (1, 2)})
    path = tmp_path / "EuroSAT" / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": sd}, path)
    load_teacher_prompts(teacher, teacher_prompt_path(tmp_path, "EuroSAT"))
    assert torch.equal(teacher.vision_ctx[2], sd["image_encoder.transformer.resblocks.2.VPT_shallow"])
    torch.save({"state_dict": dict(sd, **{"prompt_learner.ctx": torch.randn(4, 48)})}, path)   # the file changed
    with pytest.raises(ValueError, match="sha256"):
        teacher_prompt_path(tmp_path, "EuroSAT")
    del sd["image_encoder.VPT"]
    torch.save({"state_dict": sd}, tmp_path / "x.pt")
    with pytest.raises(KeyError, match="image_encoder.VPT"):
        load_teacher_prompts(teacher, tmp_path / "x.pt")

