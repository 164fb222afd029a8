"""MONAI Deploy app of the ``ct_hemorrhage`` bundle: head CT series -> haemorrhage yes/no, DICOM SR + output.json.

Run: ``python -m pipelines.deploy.ct_hemorrhage -i <dicom folder> -o <output folder> -m <model.ts>``
(see ``pipelines/deploy/README.md``).
"""

BUNDLE = "ct_hemorrhage"
