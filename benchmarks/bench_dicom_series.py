"""Time pipelines.io.dicom.load_series against SimpleITK's ImageSeriesReader on one DICOM series folder.

Usage:
    python benchmarks/bench_dicom_series.py [FOLDER] [--repeats 3]

Both readers run in the same process, best of ``--repeats`` runs each (after one untimed warm-up read each, so
the file cache is equally warm); SimpleITK includes the GDCM file-name/series scan, as a user would call it.
The script also checks that the two volumes agree voxel for voxel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipelines.io.dicom import load_series  # noqa: E402

DEFAULT = REPO_ROOT.parent / "shared" / "data" / "dicom_series_mr_trio_b17" / "t1_MPRAGEcr_noGRAPPA_19"


def _sitk_load(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT, help=f"DICOM series folder (default {DEFAULT})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per reader; the best is reported")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: DICOM series folder not found: {args.folder}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    vol = load_series(args.folder)
    ref = _sitk_load(args.folder)
    same = np.array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))

    t_ours = _best(lambda: load_series(args.folder), args.repeats)
    t_sitk = _best(lambda: _sitk_load(args.folder), args.repeats)
    print(f"series: {args.folder} ({len(vol.files)} files, volume {vol.array.shape} z,y,x)")
    print(f"voxel-exact vs SimpleITK: {same}")
    print(f"load_series (pydicom)        best of {args.repeats}: {t_ours * 1000:8.1f} ms")
    print(f"SimpleITK ImageSeriesReader  best of {args.repeats}: {t_sitk * 1000:8.1f} ms")
    print(f"ratio load_series / SimpleITK: {t_ours / t_sitk:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
