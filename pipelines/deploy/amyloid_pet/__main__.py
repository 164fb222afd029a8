"""``python -m pipelines.deploy.amyloid_pet -i <dicom folder> -o <output folder> -m <model.ts>``; also the MAP entry."""

import sys

from pipelines.deploy.app import main

if __name__ == "__main__":
    sys.exit(main("amyloid_pet"))
