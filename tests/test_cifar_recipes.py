"""Tests of `abkd.cifar.recipes`: a preset for every pair and method, the teacher registry and its checkpoint checks."""
import pytest
import torch
from torch import nn
import abkd.cifar.experiment as E
from abkd.cifar.models import create_model
from abkd.cifar.recipes import (METHODS, PAIRS, load_state_dict_file, method_params, recipe, teacher_path,
                                teacher_registry)
from abkd.cifar.train import make_loss


def test_recipes_complete_for_every_pair_and_method():
    assert len(PAIRS) == 11 and len(METHODS) == 8
    for t, s in PAIRS:
        for m in METHODS:
            cfg = recipe(t, s, m)
            assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.milestones) == \
                (240, 64, 0.9, 5e-4, (150, 180, 210))
            assert cfg.lr == (0.01 if s in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
            assert make_loss(cfg) is not None                       # every preset builds its loss
    assert method_params("dkd", "resnet56", "resnet20")["nckd_weight"] == 2.0
    assert method_params("dkd", "resnet32x4", "resnet8x4")["nckd_weight"] == 8.0
    assert method_params("abttm", "vgg13", "vgg8", (0.9, 0.5)) == dict(alpha=0.9, beta=0.5)


def test_teacher_registry_and_checkpoint_checks(tmp_path):
    reg = teacher_registry()
    assert set(reg) == {"resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"}
    assert reg["resnet32x4"].published_acc == 79.42
    with pytest.raises(FileNotFoundError, match="cifar_teachers.tar"):
        teacher_path("resnet56", tmp_path)
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

