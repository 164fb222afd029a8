"""Knowledge distillation of a DeiT student from a frozen CNN teacher (Touvron et al., ICML 2021).

Loss (student logits ``Z_cls`` from the [CLS] head, ``Z_dist`` from the [DIST] head, teacher logits ``Z_t``,
labels ``y``, weight ``alpha``, temperature ``tau``)::

    soft: (1 - alpha) * L_base(Z_cls, y) + alpha * tau**2 * KL(softmax(Z_t / tau) || softmax(Z_dist / tau))
    hard: (1 - alpha) * L_base(Z_cls, y) + alpha * CE(Z_dist, argmax Z_t)

``L_base`` is the bundle's own loss (:func:`pipelines.training.losses.make_loss`: CE or focal, class weights,
label smoothing). The KL term is averaged over the batch (``batchmean``, Hinton et al. 2015); the DeiT
reference code divides the summed KL by ``N * C`` instead, a constant ``1 / C`` that ``alpha`` absorbs.

Wiring in a MONAI bundle: MONAI's ``SupervisedTrainer`` calls ``loss_function(pred, label)``, but the teacher
needs the input images. :class:`DistillationTrainer` is a ``SupervisedTrainer`` that, after the student's
forward pass (``IterationEvents.FORWARD_COMPLETED``), hands the batch images to the loss
(:meth:`DistillationLoss.set_teacher_inputs`); the loss runs the frozen teacher on them when it is called and
then forgets them, so a batch can never be reused. Everything else (AMP, gradient accumulation, handlers) is the
unchanged MONAI iteration.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = [
    "DISTILL_MODES",
    "DistillationLoss",
    "DistillationTrainer",
    "checkpoint_digest",
    "distillation_loss",
    "hard_distillation",
    "load_teacher",
    "soft_distillation",
]

DISTILL_MODES = ("soft", "hard")


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau**2 * KL(softmax(teacher / tau) || softmax(student / tau))``, averaged over the batch.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``, treated as constants.
        tau: temperature > 0; the ``tau**2`` factor keeps gradient magnitudes comparable across temperatures.
    """
    log_p_student = F.log_softmax(student_logits / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / tau, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (tau * tau)


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax class, averaged over the batch."""
    return F.cross_entropy(student_logits, teacher_logits.detach().argmax(dim=1))


def _check_settings(mode: str, alpha: float, tau: float) -> None:
    if mode not in DISTILL_MODES:
        raise ValueError(f"distill_mode must be one of {list(DISTILL_MODES)}, got {mode!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"distill_alpha must be in [0, 1], got {alpha}")
    if not float(tau) > 0.0:
        raise ValueError(f"distill_tau must be > 0, got {tau}")


def _split_heads(student_outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls_logits, dist_logits)`` from a two-head student, or the same logits twice for a one-head one."""
    if isinstance(student_outputs, (tuple, list)):
        if len(student_outputs) != 2:
            raise ValueError(f"a distillation student returns (cls_logits, dist_logits); got {len(student_outputs)} outputs")
        return student_outputs[0], student_outputs[1]
    return student_outputs, student_outputs


def distillation_loss(
    student_outputs: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mode: str = "soft",
    alpha: float = 0.5,
    tau: float = 1.0,
) -> torch.Tensor:
    """The DeiT distillation objective (see the module docstring).

    Args:
        student_outputs: ``(cls_logits, dist_logits)``, each ``(N, C)``; a single ``(N, C)`` tensor (a student
            without a distillation token) is used for both terms.
        labels: ``(N,)`` or ``(N, 1)`` class indices.
        teacher_logits: ``(N, C)``.
        base_loss: loss on (cls_logits, labels); default plain cross-entropy.
        mode: ``"soft"`` (KL at temperature ``tau``) or ``"hard"`` (CE on the teacher's argmax).
        alpha: weight of the distillation term in [0, 1].
        tau: temperature > 0 (soft mode only).

    Returns:
        Scalar loss.
    """
    _check_settings(mode, alpha, tau)
    cls_logits, dist_logits = _split_heads(student_outputs)
    if teacher_logits.shape != dist_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(dist_logits.shape)} differ")
    if base_loss is None:
        base = F.cross_entropy(cls_logits, labels.long().view(-1))
    else:
        base = base_loss(cls_logits, labels)
    if mode == "soft":
        distill = soft_distillation(dist_logits, teacher_logits, tau)
    else:
        distill = hard_distillation(dist_logits, teacher_logits)
    return (1.0 - alpha) * base + alpha * distill


def _missing_teacher(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"teacher checkpoint not found: {path} (train the teacher first with configs/teacher_resnet50.json, "
        "or set --teacher_ckpt)"
    )


def checkpoint_digest(ckpt_path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of a checkpoint file: names the exact teacher in the run's params.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
    """
    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise _missing_teacher(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_teacher(network: nn.Module, ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load teacher weights from a MONAI ``CheckpointSaver`` file and freeze the network (eval mode, no grad).

    Args:
        network: the teacher architecture, e.g. ``pipelines.networks.cnn.build_classifier("resnet50", ...)``.
        ckpt_path: checkpoint written by training the bundle with ``configs/teacher_resnet50.json``.
        device: device to put the teacher on.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: the checkpoint does not fit ``network`` (other architecture, size or class count).
    """
    from pipelines.inference.predict import load_state_dict

    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise _missing_teacher(path)
    state = load_state_dict(path, device)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"teacher checkpoint {path} does not fit {type(network).__name__}: {e}") from None
    network = network.to(device).eval()
    network.requires_grad_(False)
    return network


class DistillationLoss(nn.Module):
    """DeiT distillation loss with the frozen teacher inside; called by MONAI as ``loss(pred, label)``.

    Args:
        teacher: trained teacher returning ``(N, C)`` logits; it is frozen here (``requires_grad_(False)``) and
            always run in eval mode without gradients.
        base_loss: loss on the [CLS] head and the labels (default: cross-entropy).
        mode: ``"soft"`` or ``"hard"``.
        alpha: weight of the distillation term in [0, 1].
        tau: soft-distillation temperature > 0.

    The teacher's input images reach the loss through :meth:`set_teacher_inputs` (done by
    :class:`DistillationTrainer` every iteration) or directly as ``teacher_logits`` in :meth:`forward`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        base_loss: nn.Module | None = None,
        mode: str = "soft",
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        _check_settings(mode, alpha, tau)
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.base_loss = base_loss
        self.mode = mode
        self.alpha = float(alpha)
        self.tau = float(tau)
        self._teacher_inputs: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        self.teacher.eval()  # a frozen teacher keeps its BatchNorm statistics and has no dropout
        return self

    def set_teacher_inputs(self, images: torch.Tensor) -> None:
        """The images of the current batch, used (once) by the next :meth:`forward` call."""
        self._teacher_inputs = images

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``(N, C)`` in eval mode, without gradients."""
        self.teacher.eval()
        out = self.teacher(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.as_tensor() if hasattr(out, "as_tensor") else out

    def forward(
        self,
        student_outputs: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Distillation loss of one batch.

        Args:
            student_outputs: ``(cls_logits, dist_logits)`` (a DeiT student in train mode) or one logits tensor.
            labels: ``(N,)`` or ``(N, 1)`` class indices.
            teacher_logits: precomputed teacher logits; default: the teacher run on the images given to
                :meth:`set_teacher_inputs` for this batch.

        Raises:
            RuntimeError: no teacher logits and no images were given for this batch.
        """
        if teacher_logits is None:
            images, self._teacher_inputs = self._teacher_inputs, None
            if images is None:
                raise RuntimeError(
                    "DistillationLoss got no images for the teacher: train with "
                    "pipelines.training.distill.DistillationTrainer, or pass teacher_logits"
                )
            teacher_logits = self.teacher_logits(images)
        return distillation_loss(student_outputs, labels, teacher_logits, self.base_loss, self.mode, self.alpha, self.tau)


class DistillationTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` whose :class:`DistillationLoss` also sees each batch's input images.

    Takes exactly the arguments of ``SupervisedTrainer``; ``network`` is the student and ``loss_function`` must
    be a :class:`DistillationLoss`. In a bundle only the trainer's ``_target_`` changes
    (``configs/deit_distill.json``).

    Raises:
        ValueError: ``loss_function`` is not a :class:`DistillationLoss`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.loss_function, DistillationLoss):
            raise ValueError(
                f"DistillationTrainer needs a pipelines.training.distill.DistillationLoss, got {type(self.loss_function).__name__}"
            )
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._pass_images_to_loss)

    @staticmethod
    def _pass_images_to_loss(engine: SupervisedTrainer) -> None:
        engine.loss_function.set_teacher_inputs(engine.state.output[CommonKeys.IMAGE])
