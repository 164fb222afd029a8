"""MONAI Deploy app of the ``alz_hybrid`` bundle: T1 MR series -> Alzheimer severity, DICOM SR + output.json.

Run: ``python -m pipelines.deploy.alz_hybrid -i <dicom folder> -o <output folder> -m <model.ts>``
(see ``pipelines/deploy/README.md``).
"""

BUNDLE = "alz_hybrid"
