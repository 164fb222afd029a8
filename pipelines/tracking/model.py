"""Log a bundle's trained network as an MLflow model (pytorch flavour), linked to its training run.

The model is the network with the best checkpoint loaded (``torch.load(..., weights_only=True)``), followed by a
softmax when the bundle's ``metadata.json`` declares logits, so ``mlflow.pyfunc.load_model(uri).predict(x)``
returns class probabilities for a float32 batch ``(N, C, H, W)`` preprocessed as the bundle does. It is saved in
MLflow's default ``pt2`` format (``torch.export``), which loads without this project's code. The signature and the
input example come from ``network_data_format`` in metadata.json (channels, spatial shape, dtype), with the
spatial size of the run when it was changed; the bundle's configs, metadata.json and a TorchScript file
(``model.ts``) are stored with the model; pip requirements are the pins of ``pyproject.toml``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipelines.tracking import REPO_ROOT

logger = logging.getLogger(__name__)


class Probabilities(torch.nn.Module):
    """``softmax(network(x), dim=1)``: the class probabilities the bundles' inference reports."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.softmax(out, dim=1)


def pinned_requirements(pyproject: str | os.PathLike = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The ``name==version`` pins of ``[project] dependencies`` (extras dropped: MLflow resolves them itself)."""
    import tomllib

    try:
        deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    except (OSError, KeyError, ValueError):
        return []
    out = []
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(==\s*[^;,\s]+)", dep)
        if m:
            out.append(f"{m.group(1)}{m.group(3).replace(' ', '')}")
    return out


def input_shape(metadata: Mapping[str, Any], image_size: Any = None) -> tuple[str, tuple[int, ...], str]:
    """``(key, (C, *spatial), dtype)`` of the first network input in metadata's ``network_data_format``;
    ``image_size`` (an int) replaces every spatial size (a run trained at another size), else ``*`` sizes
    become 64."""
    key, spec = next(iter(metadata["network_data_format"]["inputs"].items()))
    spatial = []
    for s in spec.get("spatial_shape") or []:
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            spatial.append(image_size)
        else:
            spatial.append(int(s) if isinstance(s, (int, float)) or str(s).isdigit() else 64)
    return key, (int(spec.get("num_channels", 1)), *spatial), str(spec.get("dtype", "float32"))


def outputs_logits(metadata: Mapping[str, Any]) -> bool:
    """True when the first network output is declared as logits (the model then ends with a softmax)."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    return bool(outputs) and next(iter(outputs.values())).get("type") == "logits"


def _global_tracking_uri(uri: str):
    """Point MLflow's global tracking URI at ``uri`` (``Model.log`` and ``models:/`` URIs resolve through it),
    then restore it and ``MLFLOW_TRACKING_URI``."""
    from pipelines.tracking import tracking_store

    return tracking_store(uri)


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path | None:
    try:
        with torch.no_grad():
            try:
                ts = torch.jit.script(model)
            except Exception:
                ts = torch.jit.trace(model, example, check_trace=False)
        ts.save(str(path))
        return path
    except Exception as e:  # a network that neither scripts nor traces still gets its MLflow model
        logger.warning("TorchScript export for the MLflow model failed: %s", e)
        return None


def log_bundle_model(
    client,
    run_id: str,
    network: torch.nn.Module,
    checkpoint: str | os.PathLike | None,
    bundle_root: str | os.PathLike,
    image_size: Any = None,
    step: int = 0,
    name: str = "model",
    register_model: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
):
    """Log ``network`` (with ``checkpoint`` loaded when given) as an MLflow model of run ``run_id``.

    Args:
        client: ``MlflowClient`` of the run's store.
        run_id: the training run; the model is created in its experiment with it as source run.
        network: the trained network (copied; the copy is moved to CPU).
        checkpoint: state dict to load (``torch.load(..., weights_only=True)``), e.g. the best-metric checkpoint.
        bundle_root: bundle folder, for ``configs/metadata.json`` and the config files.
        image_size: spatial size the run trained at (replaces metadata's spatial shape).
        step: the run's metrics at this step (the best epoch) are attached to the LoggedModel.
        name: the model's name.
        register_model: when set, register the model under this name in the Model Registry.
        tags, params: put on the LoggedModel.

    Returns:
        MLflow's ``ModelInfo`` (``model_id``, ``model_uri``, ``registered_model_version``).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    bundle_root = Path(bundle_root)
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    model = copy.deepcopy(network).cpu().eval()
    if checkpoint is not None:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        model.load_state_dict(state)
    if outputs_logits(metadata):
        model = Probabilities(model).eval()
    _, shape, dtype = input_shape(metadata, image_size)
    # two samples: torch.export keeps the batch dimension dynamic (a batch of one would be specialised)
    example = np.random.default_rng(0).random((2, *shape)).astype(dtype)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
        tags=dict(tags or {}), params=dict(params or {}),
    )
    with tempfile.TemporaryDirectory() as tmp, _global_tracking_uri(client.tracking_uri):
        extra = [str(p) for p in sorted((bundle_root / "configs").glob("*.json"))]
        ts = _torchscript(model, torch.from_numpy(example), Path(tmp) / "model.ts")
        if ts is not None:
            extra.append(str(ts))
        info = mlflow.pytorch.log_model(
            model, name=name, run_id=run_id, model_id=logged.model_id, signature=signature,
            input_example=example, pip_requirements=pinned_requirements(), extra_files=extra, step=step,
        )
        if register_model:
            from mlflow.exceptions import MlflowException

            try:
                client.get_registered_model(register_model)
            except MlflowException:
                client.create_registered_model(register_model)
            mv = client.create_model_version(register_model, info.model_uri, run_id=run_id, model_id=logged.model_id)
            info.registered_model_version = mv.version
            logger.info("registered %s as %s version %s", info.model_uri, register_model, mv.version)
    return info
