"""DeiT student network, distillation losses and the distillation trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.utils import CommonKeys

from pipelines.evaluation.explain import attention_rollout
from pipelines.networks.deit import DeiTClassifier
from pipelines.training.distill import (
    DistillationLoss,
    DistillationTrainer,
    distillation_loss,
    hard_distillation,
    load_teacher,
    soft_distillation,
)

# Two samples, three classes; the teacher's argmax is class 0 then class 2.
STUDENT = np.array([[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]])
TEACHER = np.array([[3.0, 0.0, -1.0], [0.0, 1.0, 2.0]])
LABELS = np.array([1, 2])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _hand_soft(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    log_ps, log_pt = _log_softmax(student / tau), _log_softmax(teacher / tau)
    kl_per_sample = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    return float(kl_per_sample.mean() * tau**2)


def _hand_ce(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-_log_softmax(logits)[np.arange(len(targets)), targets].mean())


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def _tiny_deit(**kw) -> DeiTClassifier:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, dropout=0.0)
    args.update(kw)
    return DeiTClassifier(in_channels=1, num_classes=3, **args)


class _LinearTeacher(nn.Module):
    """A deterministic "teacher": mean intensity times a fixed vector, plus BatchNorm to catch train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(1, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-2.0], [0.5]]))
            self.fc.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.mean(dim=(1, 2, 3))[:, None]))


# -- losses on known logits -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_equals_tau_squared_kl(tau):
    got = soft_distillation(_t(STUDENT), _t(TEACHER), tau)
    assert got.item() == pytest.approx(_hand_soft(STUDENT, TEACHER, tau), rel=1e-10)


def test_hard_distillation_is_cross_entropy_on_teacher_argmax():
    got = hard_distillation(_t(STUDENT), _t(TEACHER))
    assert got.item() == pytest.approx(_hand_ce(STUDENT, np.array([0, 2])), rel=1e-10)


def test_soft_distillation_loss_mixes_label_ce_and_kl_with_alpha():
    cls_logits = STUDENT[::-1].copy()
    got = distillation_loss((_t(cls_logits), _t(STUDENT)), torch.as_tensor(LABELS)[:, None], _t(TEACHER),
                            mode="soft", alpha=0.25, tau=2.0)
    want = 0.75 * _hand_ce(cls_logits, LABELS) + 0.25 * _hand_soft(STUDENT, TEACHER, 2.0)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_hard_distillation_loss_mixes_label_ce_and_teacher_ce_with_alpha():
    cls_logits = STUDENT[::-1].copy()
    got = distillation_loss((_t(cls_logits), _t(STUDENT)), torch.as_tensor(LABELS), _t(TEACHER), mode="hard", alpha=0.5)
    want = 0.5 * _hand_ce(cls_logits, LABELS) + 0.5 * _hand_ce(STUDENT, np.array([0, 2]))
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_distillation_loss_uses_given_base_loss_on_the_class_head():
    got = distillation_loss((_t(STUDENT), _t(STUDENT)), torch.as_tensor(LABELS), _t(TEACHER),
                            base_loss=lambda logits, labels: logits.sum() * 0 + 7.0, mode="hard", alpha=0.5)
    assert got.item() == pytest.approx(0.5 * 7.0 + 0.5 * _hand_ce(STUDENT, np.array([0, 2])), rel=1e-10)


def test_single_head_student_gets_both_terms_on_its_logits():
    one = distillation_loss(_t(STUDENT), torch.as_tensor(LABELS), _t(TEACHER), mode="soft", alpha=0.5, tau=3.0)
    two = distillation_loss((_t(STUDENT), _t(STUDENT)), torch.as_tensor(LABELS), _t(TEACHER), mode="soft", alpha=0.5, tau=3.0)
    assert one.item() == pytest.approx(two.item(), rel=1e-12)


@pytest.mark.parametrize("kw", [{"mode": "medium"}, {"alpha": 1.5}, {"alpha": -0.1}, {"tau": 0.0}])
def test_bad_distillation_settings_raise_value_error(kw):
    with pytest.raises(ValueError):
        DistillationLoss(_LinearTeacher(), **kw)


def test_loss_runs_the_frozen_teacher_on_the_given_images():
    teacher = _LinearTeacher()
    loss = DistillationLoss(teacher, mode="soft", alpha=0.5, tau=2.0).train()
    images = torch.rand(4, 1, 8, 8)
    student = (torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True))
    labels = torch.tensor([[0], [1], [2], [1]])
    loss.set_teacher_inputs(images)
    got = loss(student, labels)
    with torch.no_grad():
        want = distillation_loss(student, labels, teacher.eval()(images), mode="soft", alpha=0.5, tau=2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_loss_without_teacher_inputs_raises_runtime_error():
    loss = DistillationLoss(_LinearTeacher())
    loss.set_teacher_inputs(torch.rand(2, 1, 8, 8))
    loss((torch.zeros(2, 3), torch.zeros(2, 3)), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="DistillationTrainer"):
        loss((torch.zeros(2, 3), torch.zeros(2, 3)), torch.tensor([0, 1]))  # images are used once only


# -- network ----------------------------------------------------------------------------------------------------
def test_train_forward_returns_class_and_distillation_logits():
    net = _tiny_deit().train()
    cls_logits, dist_logits = net(torch.rand(5, 1, 32, 32))
    assert cls_logits.shape == dist_logits.shape == (5, 3)
    assert not torch.allclose(cls_logits, dist_logits)


def test_eval_forward_is_the_mean_of_both_heads():
    net = _tiny_deit().eval()
    x = torch.rand(3, 1, 32, 32)
    cls_logits, dist_logits = net.forward_heads(x)
    torch.testing.assert_close(net(x), (cls_logits + dist_logits) / 2)


def test_traced_and_scripted_deit_equal_eager():
    net = _tiny_deit().eval()
    x = torch.rand(2, 1, 32, 32)
    eager = net(x)
    torch.testing.assert_close(torch.jit.trace(net, x)(x), eager)
    torch.testing.assert_close(torch.jit.script(net)(x), eager)


def test_rollout_skips_both_prefix_tokens():
    net = _tiny_deit().eval()
    assert net.num_prefix_tokens == 2 and net.feature_grid == (4, 4)
    maps = attention_rollout(net, torch.rand(2, 1, 32, 32))
    assert maps.shape == (2, 1, 32, 32)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 1))


@pytest.mark.parametrize("kw", [{"img_size": 30}, {"hidden_size": 30, "num_heads": 4}, {"dropout": 1.0}, {"num_layers": 0}])
def test_bad_deit_arguments_raise_value_error(kw):
    with pytest.raises(ValueError):
        _tiny_deit(**kw)


# -- trainer and teacher loading ------------------------------------------------------------------------------
def test_trainer_loss_uses_teacher_logits_of_the_batch_images():
    student, teacher = _tiny_deit(), _LinearTeacher()
    images = torch.rand(4, 1, 32, 32)
    labels = torch.tensor([[0], [1], [2], [0]])
    loader = torch.utils.data.DataLoader([{"image": i, "label": y} for i, y in zip(images, labels)], batch_size=4)
    loss = DistillationLoss(teacher, mode="hard", alpha=0.5)
    trainer = DistillationTrainer(
        device="cpu", max_epochs=1, train_data_loader=loader, network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.0), loss_function=loss, decollate=False,
    )
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.run()
    student.train()
    with torch.no_grad():
        want = distillation_loss(student(images), labels, teacher.eval()(images), mode="hard", alpha=0.5)
    assert trainer.state.output[CommonKeys.LOSS].item() == pytest.approx(want.item(), rel=1e-5)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_trainer_refuses_a_plain_loss():
    net = _tiny_deit()
    loader = torch.utils.data.DataLoader([{"image": torch.rand(1, 32, 32), "label": torch.tensor([0])}])
    with pytest.raises(ValueError, match="DistillationLoss"):
        DistillationTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net,
                            optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=nn.CrossEntropyLoss())


def test_load_teacher_restores_weights_and_freezes(tmp_path):
    src = _LinearTeacher()
    with torch.no_grad():
        src.fc.weight.mul_(3.0)
    torch.save({"model": src.state_dict()}, tmp_path / "model.pt")
    teacher = load_teacher(_LinearTeacher(), tmp_path / "model.pt")
    torch.testing.assert_close(teacher.fc.weight, src.fc.weight)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_load_teacher_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_teacher(_LinearTeacher(), tmp_path / "nope.pt")


def test_load_teacher_other_architecture_raises_value_error(tmp_path):
    torch.save({"model": nn.Linear(2, 2).state_dict()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_teacher(_LinearTeacher(), tmp_path / "model.pt")


def test_checkpoint_digest_is_the_sha256_prefix_of_the_file(tmp_path):
    import hashlib

    from pipelines.training.distill import checkpoint_digest

    (tmp_path / "model.pt").write_bytes(b"weights")
    assert checkpoint_digest(tmp_path / "model.pt") == hashlib.sha256(b"weights").hexdigest()[:16]
