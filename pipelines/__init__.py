"""Project pipelines: networks, manifests, evaluation, tracking, inference, deploy (see README.md)."""

from pipelines.errors import install_for_bundle_run as _install_for_bundle_run

# one-line input errors under `python -m monai.bundle run` only (see pipelines.errors)
_install_for_bundle_run()
