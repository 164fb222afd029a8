"""Deployment of the bundles: MONAI Deploy apps (DICOM in, DICOM SR + output.json out) and an HTTP service.

* :mod:`pipelines.deploy.specs` - one :class:`~pipelines.deploy.specs.BundleAppSpec` per bundle with a DICOM use
  (``alz_hybrid`` MR, ``ct_hemorrhage`` CT, ``amyloid_pet`` PT).
* :mod:`pipelines.deploy.classifier` - :class:`~pipelines.deploy.classifier.StudyClassifier`: exported TorchScript
  model + the bundle's own inference predictor from its config; the JSON result.
* :mod:`pipelines.deploy.sr` - the Comprehensive SR (highdicom, TID 1500).
* :mod:`pipelines.deploy.operators`, :mod:`pipelines.deploy.app` - the MONAI Deploy App SDK pipeline (optional
  ``deploy`` extra) and the same logic without the SDK; ``python -m pipelines.deploy.<bundle>``.
* :mod:`pipelines.deploy.service` - FastAPI service (optional ``serve`` extra).
* :mod:`pipelines.deploy.package` - stage an app folder for ``monai-deploy package``.

Nothing here imports the SDK, FastAPI or uvicorn at package import time. See ``pipelines/deploy/README.md``.
"""
