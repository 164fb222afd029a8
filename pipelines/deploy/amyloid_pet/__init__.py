"""MONAI Deploy app of the ``amyloid_pet`` bundle: brain PET series -> amyloid visual read, DICOM SR + output.json.

Run: ``python -m pipelines.deploy.amyloid_pet -i <dicom folder> -o <output folder> -m <model.ts>``
(see ``pipelines/deploy/README.md``).
"""

BUNDLE = "amyloid_pet"
