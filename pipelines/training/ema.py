"""Exponential moving average (EMA) of a network's weights, as a MONAI/ignite handler.

Short CPU budgets end training while the weights still jump from step to step; the average of the recent
weights generalises better than the last ones (Polyak & Juditsky 1992; the EMA used by Tan & Le's EfficientNet
and by timm's ``ModelEmaV2``). The bundles validate, checkpoint and export the EMA copy, so ``model.pt`` holds
averaged weights under the usual ``"model"`` key and loads into ``network_def`` unchanged.

Update after every iteration ``t`` (``decay_t = min(decay, (1 + t) / (10 + t))``, a warm-up so the average
is not dominated by the random initialisation)::

    ema = decay_t * ema + (1 - decay_t) * weights      # parameters and floating-point buffers (BN statistics)
    ema = weights                                      # integer buffers (BN batch counters)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

__all__ = ["ModelEMA", "EMAHandler"]


class ModelEMA:
    """Keeps ``module``, an averaged copy of ``network``.

    Args:
        network: the trained network (DDP-wrapped networks are unwrapped).
        decay: EMA decay per iteration in [0, 1); 0 makes ``module`` a plain copy of the latest weights.

    Raises:
        ValueError: ``decay`` outside [0, 1).
    """

    def __init__(self, network: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        source = getattr(network, "module", network)
        self.module = copy.deepcopy(source).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        source = getattr(network, "module", network)
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema_state = self.module.state_dict()
        for name, value in source.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                target.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


class EMAHandler:
    """Updates a :class:`ModelEMA` after every training iteration.

    Args:
        ema: the average to update.
        network: the network being trained.
    """

    def __init__(self, ema: ModelEMA, network: nn.Module) -> None:
        self.ema, self.network = ema, network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.ema.update(self.network)
