"""Networks: every classifier returns one logits tensor and traces for TorchScript export."""

from pipelines.networks.hybrid import CNNViTHybrid
from pipelines.networks.vit import ViTClassifier
from pipelines.networks.deit import DeiTClassifier

__all__ = ["CNNViTHybrid", "DeiTClassifier", "ViTClassifier"]
