"""Session fixtures of the deploy tests: phantom DICOM series, tiny exported models, classifiers, references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import (
    ALZ_TINY,
    CT_TINY,
    PET_TINY,
    export_tiny_model,
    phantom_volume,
    write_ct_series,
    write_mr_series,
    write_pet_dir,
)

#: bundle -> (tiny config overrides, writer of its phantom series)
CASES = {
    "alz_hybrid": (ALZ_TINY, lambda folder: write_mr_series(phantom_volume(), folder)),
    "ct_hemorrhage": (CT_TINY, write_ct_series),
    "amyloid_pet": (PET_TINY, write_pet_dir),
}


@dataclass
class BundleCase:
    """Everything a test needs for one bundle's app."""

    bundle: str
    overrides: dict
    series: Path
    model_ts: Path
    model_pt: Path

    def reference(self) -> dict[str, Any]:
        """The bundle's own inference on :attr:`series`: its inference.json ``predictor`` (eager network with the
        weights in model.pt), as ``{"predicted_class", "probabilities", "slice_index": [...], "slice_probs"}``."""
        from pipelines.bundles import load_config

        parser = load_config(self.bundle, "inference.json", overrides={
            **self.overrides, "ckpt_path": str(self.model_pt), "device": "$torch.device('cpu')"})
        predictor = parser.get_parsed_content("predictor")
        if hasattr(predictor, "predict_series"):
            (ref,) = predictor.predict_series(self.series)
        else:
            ref = predictor.predict_volume(self.series)
        names = list(predictor.class_names)
        return {
            "predicted_class": ref["predicted_class"],
            "probabilities": [ref["probabilities"][c] for c in names],
            "slice_index": [s["slice_index"] for s in ref["slices"]],
            "slice_probs": [[s[f"prob_{c}"] for c in names] for s in ref["slices"]],
        }


def _make_case(root: Path, bundle: str) -> BundleCase:
    overrides, write = CASES[bundle]
    series = root / bundle / "series"
    write(series)
    ts, pt = export_tiny_model(root / bundle / "model", bundle, overrides)
    return BundleCase(bundle, dict(overrides), series, ts, pt)


@pytest.fixture(scope="session")
def deploy_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="session")
def alz_case(deploy_root) -> BundleCase:
    return _make_case(deploy_root, "alz_hybrid")


@pytest.fixture(scope="session", params=sorted(CASES))
def bundle_case(request, deploy_root, alz_case) -> BundleCase:
    """Each bundle with a deploy app, once per session."""
    if request.param == "alz_hybrid":
        return alz_case
    return _make_case(deploy_root, request.param)


@pytest.fixture(scope="session")
def mr_volume():
    return phantom_volume()


@pytest.fixture(scope="session")
def mr_series(alz_case) -> Path:
    """Folder of a 24-slice axial MR phantom series (40x48 pixels, 3 mm), files named in shuffled order."""
    return alz_case.series


@pytest.fixture(scope="session")
def tiny_model(alz_case) -> tuple[Path, Path]:
    """``(model.ts, model.pt)``: alz_hybrid's network at tiny sizes, random weights, via ckpt_export."""
    return alz_case.model_ts, alz_case.model_pt


@pytest.fixture(scope="session")
def classifier(tiny_model):
    from pipelines.deploy.classifier import StudyClassifier

    return StudyClassifier("alz_hybrid", tiny_model[0], overrides=ALZ_TINY, device="cpu")


@pytest.fixture(scope="session")
def mr_result(classifier, mr_series) -> dict:
    """The alz_hybrid classification of :func:`mr_series` (no SDK)."""
    from pipelines.io.dicom import load_series

    return classifier.classify_series(load_series(mr_series))


@pytest.fixture(scope="session")
def bundle_predictor(tiny_model):
    """alz_hybrid's own inference: inference.json's ``predictor`` (eager network, weights from model.pt)."""
    from pipelines.bundles import load_config

    parser = load_config("alz_hybrid", "inference.json", overrides={
        **ALZ_TINY, "ckpt_path": str(tiny_model[1]), "device": "$torch.device('cpu')"})
    return parser.get_parsed_content("predictor")
