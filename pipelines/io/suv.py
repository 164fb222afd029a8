"""Body-weight SUV (SUVbw) scale factors from PET DICOM headers, after the QIBA vendor-neutral pseudo-code.

The QIBA PET/CT technical committee's "vendor-neutral pseudo-code for SUV calculation"
(https://qibawiki.rsna.org/index.php/Standardized_Uptake_Value_(SUV)) is followed step by step:

1. ``CorrectedImage`` (0028,0051) must contain ``ATTN`` and ``DECY``.
2. ``Units`` (0054,1001):

   * ``BQML``: ``factor = PatientWeight[g] / decayed_dose[Bq]`` with
     ``decayed_dose = RadionuclideTotalDose * 2 ** (-(scan - injection) / RadionuclideHalfLife)``.
   * ``CNTS`` (Philips): the private SUV scale factor (7053,1000) is the factor; when it is absent and the
     activity-concentration scale factor (7053,1009) is present, ``(7053,1009) * BQML factor``.
   * ``GML``: the pixels already are SUVbw (g/ml), ``factor = 1``.
   * anything else: :class:`SUVError`.

3. ``DecayCorrection`` (0054,1102): ``START`` (images decay-corrected to the scan start: the dose decays from
   injection to the scan time), ``ADMIN`` (images decay-corrected to the administration time: no decay of the
   dose), ``NONE`` and anything else: :class:`SUVError` (the frame-by-frame decay would have to be undone first;
   not supported on purpose).
4. Scan time: ``SeriesDate``/``SeriesTime`` when they are not after the earliest ``AcquisitionDate``/
   ``AcquisitionTime`` of the series; otherwise (series re-created by post-processing) the GE private scan
   date-time (0009,100D) when present, else the earliest acquisition date-time of the instances given.
5. Injection time: ``RadiopharmaceuticalStartDateTime`` (0018,1078) when present, else
   ``RadiopharmaceuticalStartTime`` (0018,1072) on ``SeriesDate``; if that falls after the scan time the
   injection is taken to be on the previous day (injected before midnight, scanned after).

How the factor combines with the pixel data (the part that is easy to get wrong):

    SUV = (stored_value * RescaleSlope + RescaleIntercept) * factor

``RescaleSlope``/``RescaleIntercept`` belong to each instance (scanners scale every slice of an int16 series on
its own), the factor belongs to the series. :func:`series_suv_factor` therefore computes the factor once and
excludes the slope; the image loader applies each instance's slope/intercept when it builds the volume (Bq/ml for
``BQML``), and ``transforms.pet.SUVScale`` then multiplies the whole volume by ``factor``. Never multiply the
factor by a slope.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

__all__ = [
    "SUVError",
    "SUVFactor",
    "rescale_to_suv",
    "series_suv_factor",
    "suv_bw_factor",
]

SUPPORTED_UNITS = ("BQML", "CNTS", "GML")
SUPPORTED_DECAY_CORRECTIONS = ("START", "ADMIN")
PHILIPS_PRIVATE_CREATOR = "Philips PET Private Group"
GE_PRIVATE_CREATOR = "GEMS_PETD_01"
# Fallback element offsets when the private creator is missing (the usual reservation at xx10 -> 10xx).
_PHILIPS_SUV_TAG = (0x7053, 0x1000)
_PHILIPS_ACTIVITY_TAG = (0x7053, 0x1009)
_GE_SCAN_DATETIME_TAG = (0x0009, 0x100D)


class SUVError(ValueError):
    """A PET header lacks, or has invalid, information needed for SUVbw."""


@dataclass(frozen=True)
class SUVFactor:
    """Series-level body-weight SUV scale factor and the header values it came from.

    Attributes:
        factor: SUVbw (g/ml) per rescaled pixel unit: ``SUV = (stored * RescaleSlope + RescaleIntercept) * factor``.
            For ``BQML`` the rescaled unit is Bq/ml, so ``factor`` is in g/Bq (typically 1e-4 .. 1e-3).
        units: DICOM ``Units`` (``BQML``, ``CNTS`` or ``GML``).
        method: how the factor was obtained (``"BQML weight/decayed dose"``, ``"CNTS Philips (7053,1000)"``,
            ``"CNTS Philips (7053,1009) x BQML"``, ``"GML identity"``).
        decay_correction: DICOM ``DecayCorrection`` (``START`` or ``ADMIN``).
        activity_scale: Bq/ml per rescaled pixel unit (1.0 for ``BQML``, Philips (7053,1009) for ``CNTS`` when
            present), ``None`` when unknown (``GML``, ``CNTS`` without (7053,1009)).
        injected_dose_bq: ``RadionuclideTotalDose`` in Bq (``None`` when not used).
        decay_corrected_dose_bq: the dose decayed to the scan time (``START``) or the injected dose (``ADMIN``), Bq.
        weight_kg: ``PatientWeight`` in kg.
        scan_datetime: decay reference time of the images (scan start), naive local time.
        injection_datetime: radiopharmaceutical administration time, naive local time.
        half_life_s: ``RadionuclideHalfLife`` in s.
        decay_time_s: ``scan_datetime - injection_datetime`` in s (0 for ``ADMIN``).
        notes: every non-default decision taken (fallbacks, previous-day injection, ...).
    """

    factor: float
    units: str
    method: str
    decay_correction: str | None = None
    activity_scale: float | None = None
    injected_dose_bq: float | None = None
    decay_corrected_dose_bq: float | None = None
    weight_kg: float | None = None
    scan_datetime: datetime | None = None
    injection_datetime: datetime | None = None
    half_life_s: float | None = None
    decay_time_s: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-friendly dict (datetimes as ISO strings, notes joined with ``"; "``) for manifests."""
        out = asdict(self)
        for key in ("scan_datetime", "injection_datetime"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        out["notes"] = "; ".join(self.notes)
        return out


# --------------------------------------------------------------------------------------------- helpers


def _label(datasets: Sequence[Dataset]) -> str:
    name = getattr(datasets[0], "filename", None)
    if not name:
        return "<dataset without filename>"
    return str(name) if len(datasets) == 1 else f"{name} (+{len(datasets) - 1} more instances)"


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _positive_float(value) -> float | None:
    """Float > 0 from a DS/number, or None when absent, empty, non-numeric, non-finite or <= 0."""
    text = _text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _corrected_image(ds: Dataset) -> list[str]:
    value = ds.get("CorrectedImage")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip().upper() for v in values if str(v).strip()]


def _radiopharm_item(ds: Dataset) -> Dataset | None:
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    return seq[0] if seq else None


def _parse_date(value) -> date | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return DA(text)
    except ValueError:
        return None


def _parse_time(value) -> time | None:
    text = _text(value)
    if text is None:
        return None
    try:
        # ACR-NEMA style "HH:MM:SS" still occurs in old files.
        return TM(text.replace(":", ""))
    except ValueError:
        return None


def _naive(moment: datetime, notes: list[str], what: str) -> datetime:
    if moment.tzinfo is not None:
        notes.append(f"{what} UTC offset ignored (all times compared as local scanner time)")
        return moment.replace(tzinfo=None)
    return moment


def _parse_datetime(value, notes: list[str], what: str) -> datetime | None:
    text = _text(value)
    if text is None:
        return None
    try:
        moment = DT(text)
    except ValueError:
        return None
    plain = datetime(
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second, moment.microsecond,
        tzinfo=moment.tzinfo,
    )
    return _naive(plain, notes, what)


def _combine(day: date | None, clock: time | None) -> datetime | None:
    if day is None or clock is None:
        return None
    return datetime.combine(day, clock.replace(tzinfo=None))


def _private_value(ds: Dataset, creator: str, element_offset: int, fallback_tag: tuple[int, int]):
    """Value of a private element, located through its private creator, else at its usual fixed tag."""
    group = fallback_tag[0]
    try:
        block = ds.private_block(group, creator)
        if element_offset in block:
            return block[element_offset].value
    except KeyError:
        pass
    if fallback_tag in ds:
        return ds[fallback_tag].value
    return None


def _private_float(value) -> float | None:
    """Positive float from a private DS element, tolerating the raw bytes (VR UN) of implicit-VR files."""
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("ascii").strip("\x00 ")
        except UnicodeDecodeError:
            return None
    return _positive_float(value)


def _acquisition_datetime(ds: Dataset, notes: list[str]) -> datetime | None:
    moment = _parse_datetime(ds.get("AcquisitionDateTime"), notes, "AcquisitionDateTime")
    if moment is not None:
        return moment
    day = _parse_date(ds.get("AcquisitionDate")) or _parse_date(ds.get("SeriesDate"))
    return _combine(day, _parse_time(ds.get("AcquisitionTime")))


def _scan_datetime(datasets: Sequence[Dataset], notes: list[str]) -> datetime | None:
    """QIBA scan (decay reference) date-time; None when neither series nor acquisition times are usable."""
    first = datasets[0]
    series = _combine(_parse_date(first.get("SeriesDate")), _parse_time(first.get("SeriesTime")))
    acquisitions = [a for a in (_acquisition_datetime(ds, notes) for ds in datasets) if a is not None]
    earliest = min(acquisitions) if acquisitions else None
    if series is not None and (earliest is None or series <= earliest):
        return series
    if series is None:
        if earliest is not None:
            notes.append("SeriesDate/SeriesTime missing: scan time = earliest acquisition date-time")
        return earliest
    ge_value = _private_value(first, GE_PRIVATE_CREATOR, 0x0D, _GE_SCAN_DATETIME_TAG)
    if isinstance(ge_value, bytes | bytearray):
        ge_value = ge_value.decode("ascii", errors="ignore").strip("\x00 ")
    ge_scan = _parse_datetime(ge_value, notes, "GE scan date-time")
    if ge_scan is not None:
        notes.append("series time after acquisition time: scan time = GE private scan date-time (0009,100D)")
        return ge_scan
    notes.append("series time after acquisition time: scan time = earliest acquisition date-time")
    return earliest


def _injection_datetime(
    item: Dataset, series_date: date | None, scan: datetime, notes: list[str]
) -> tuple[datetime | None, str | None]:
    """Injection date-time and an error message (None when fine)."""
    start = _parse_datetime(item.get("RadiopharmaceuticalStartDateTime"), notes, "RadiopharmaceuticalStartDateTime")
    if start is not None:
        if start > scan:
            return None, (
                f"RadiopharmaceuticalStartDateTime {start.isoformat()} is after the scan time {scan.isoformat()}"
            )
        return start, None
    clock = _parse_time(item.get("RadiopharmaceuticalStartTime"))
    if clock is None:
        return None, "RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime missing or invalid"
    start = _combine(series_date or scan.date(), clock)
    if start > scan:
        start -= timedelta(days=1)
        notes.append(
            "RadiopharmaceuticalStartTime after the scan time on the same day: injection taken on the previous "
            "day (before midnight)"
        )
    return start, None


# ------------------------------------------------------------------------------------------ public API


def suv_bw_factor(ds_or_list: Dataset | Sequence[Dataset]) -> SUVFactor:
    """Body-weight SUV scale factor of one PET instance, or of the instances of one series.

    Series-level tags are read from the first dataset; with several datasets the earliest acquisition time
    over all of them is used (QIBA scan-time rule). Use :func:`series_suv_factor` to also check that the
    instances agree.

    Args:
        ds_or_list: a pydicom Dataset, or a non-empty sequence of Datasets of one series.

    Returns:
        The factor and the header values behind it; ``SUV = (stored * RescaleSlope + RescaleIntercept) * factor``.

    Raises:
        SUVError: one error listing every missing or invalid tag, naming the file when known.
    """
    datasets = [ds_or_list] if isinstance(ds_or_list, Dataset) else list(ds_or_list)
    if not datasets:
        raise SUVError("suv_bw_factor: no datasets given")
    ds = datasets[0]
    where = _label(datasets)
    problems: list[str] = []
    notes: list[str] = []

    units = (_text(ds.get("Units")) or "").upper()
    if not units:
        problems.append("Units (0054,1001) missing")
    elif units not in SUPPORTED_UNITS:
        problems.append(f"Units {units!r} not supported (expected one of {', '.join(SUPPORTED_UNITS)})")

    corrected = set(_corrected_image(ds))
    for needed in ("ATTN", "DECY"):
        if needed not in corrected:
            problems.append(f"CorrectedImage (0028,0051) lacks {needed} (has {sorted(corrected) or 'nothing'})")

    decay_correction = (_text(ds.get("DecayCorrection")) or "").upper()
    if not decay_correction:
        problems.append("DecayCorrection (0054,1102) missing")
    elif decay_correction not in SUPPORTED_DECAY_CORRECTIONS:
        problems.append(
            f"DecayCorrection {decay_correction!r} not supported (START or ADMIN; NONE would need the per-frame "
            "decay to be undone)"
        )

    weight_kg = _positive_float(ds.get("PatientWeight"))
    item = _radiopharm_item(ds)
    philips_suv = philips_activity = None
    if units == "CNTS":
        philips_suv = _private_float(_private_value(ds, PHILIPS_PRIVATE_CREATOR, 0x00, _PHILIPS_SUV_TAG))
        philips_activity = _private_float(_private_value(ds, PHILIPS_PRIVATE_CREATOR, 0x09, _PHILIPS_ACTIVITY_TAG))
        if philips_suv is None and philips_activity is None:
            problems.append(
                "Units CNTS but neither Philips SUV scale factor (7053,1000) nor activity concentration scale "
                "factor (7053,1009) is present and positive"
            )
    needs_dose = units == "BQML" or (units == "CNTS" and philips_suv is None and philips_activity is not None)

    dose_bq = half_life_s = None
    if needs_dose:
        if weight_kg is None:
            problems.append("PatientWeight (0010,1030) missing or not > 0")
        if item is None:
            problems.append("RadiopharmaceuticalInformationSequence (0054,0016) missing or empty")
        dose_bq = _positive_float(item.get("RadionuclideTotalDose")) if item is not None else None
        half_life_s = _positive_float(item.get("RadionuclideHalfLife")) if item is not None else None
        if dose_bq is None:
            problems.append("RadionuclideTotalDose (0018,1074) missing or not > 0")
        if half_life_s is None:
            problems.append("RadionuclideHalfLife (0018,1075) missing or not > 0")

    scan = injection = None
    if needs_dose and decay_correction == "START":
        scan = _scan_datetime(datasets, notes)
        if scan is None:
            problems.append("SeriesDate/SeriesTime (and AcquisitionDate/AcquisitionTime) missing or invalid")
        elif item is not None:
            injection, error = _injection_datetime(item, _parse_date(ds.get("SeriesDate")), scan, notes)
            if error:
                problems.append(error)
        else:
            problems.append("RadiopharmaceuticalStartDateTime/RadiopharmaceuticalStartTime missing")

    if problems:
        raise SUVError(f"{where}: cannot compute SUVbw: " + "; ".join(problems))

    if units == "GML":
        return SUVFactor(
            factor=1.0, units=units, method="GML identity", decay_correction=decay_correction,
            weight_kg=weight_kg, notes=tuple(notes),
        )
    if units == "CNTS" and philips_suv is not None:
        return SUVFactor(
            factor=philips_suv, units=units, method="CNTS Philips (7053,1000)", decay_correction=decay_correction,
            activity_scale=philips_activity, weight_kg=weight_kg, notes=tuple(notes),
        )

    if decay_correction == "START":
        decay_time_s = (scan - injection).total_seconds()
        decayed_dose = dose_bq * 2.0 ** (-decay_time_s / half_life_s)
    else:
        decay_time_s = 0.0
        decayed_dose = dose_bq
        notes.append("DecayCorrection ADMIN: images decay-corrected to injection, dose not decayed")
        scan = _scan_datetime(datasets, [])
        if item is not None:
            injection = _parse_datetime(item.get("RadiopharmaceuticalStartDateTime"), [], "") or (
                _combine(_parse_date(ds.get("SeriesDate")), _parse_time(item.get("RadiopharmaceuticalStartTime")))
            )
    bqml_factor = weight_kg * 1000.0 / decayed_dose
    if units == "CNTS":
        factor, method, activity_scale = philips_activity * bqml_factor, "CNTS Philips (7053,1009) x BQML", (
            philips_activity
        )
    else:
        factor, method, activity_scale = bqml_factor, "BQML weight/decayed dose", 1.0
    return SUVFactor(
        factor=factor,
        units=units,
        method=method,
        decay_correction=decay_correction,
        activity_scale=activity_scale,
        injected_dose_bq=dose_bq,
        decay_corrected_dose_bq=decayed_dose,
        weight_kg=weight_kg,
        scan_datetime=scan,
        injection_datetime=injection,
        half_life_s=half_life_s,
        decay_time_s=decay_time_s,
        notes=tuple(notes),
    )


def _series_signature(ds: Dataset) -> dict[str, object]:
    item = _radiopharm_item(ds) or Dataset()
    return {
        "SeriesInstanceUID": _text(ds.get("SeriesInstanceUID")),
        "Units": _text(ds.get("Units")),
        "DecayCorrection": _text(ds.get("DecayCorrection")),
        "CorrectedImage": tuple(sorted(set(_corrected_image(ds)))),
        "PatientWeight": _positive_float(ds.get("PatientWeight")),
        "SeriesDate": _text(ds.get("SeriesDate")),
        "SeriesTime": _text(ds.get("SeriesTime")),
        "RadionuclideTotalDose": _positive_float(item.get("RadionuclideTotalDose")),
        "RadionuclideHalfLife": _positive_float(item.get("RadionuclideHalfLife")),
        "RadiopharmaceuticalStartDateTime": _text(item.get("RadiopharmaceuticalStartDateTime")),
        "RadiopharmaceuticalStartTime": _text(item.get("RadiopharmaceuticalStartTime")),
        "Philips (7053,1000)": _private_float(_private_value(ds, PHILIPS_PRIVATE_CREATOR, 0x00, _PHILIPS_SUV_TAG)),
        "Philips (7053,1009)": _private_float(
            _private_value(ds, PHILIPS_PRIVATE_CREATOR, 0x09, _PHILIPS_ACTIVITY_TAG)
        ),
    }


def series_suv_factor(datasets: Sequence[Dataset | str | Path]) -> SUVFactor:
    """One SUVbw factor for a whole series, after checking that the SUV-relevant tags agree across instances.

    ``RescaleSlope``/``RescaleIntercept`` may differ per instance and are deliberately not part of the factor:
    build the activity volume with each instance's own slope/intercept, then multiply by ``factor``
    (``transforms.pet.SUVScale``). The earliest acquisition time over all instances enters the QIBA scan time.

    Args:
        datasets: Datasets or DICOM file paths (read header-only) of one series; non-empty.

    Returns:
        The series' :class:`SUVFactor`.

    Raises:
        SUVError: empty input, instances from different series or with disagreeing SUV tags (the tag, both
            values and both files are named), or any error of :func:`suv_bw_factor`.
        FileNotFoundError: a path that does not exist.
    """
    loaded: list[Dataset] = []
    for item in datasets:
        if isinstance(item, Dataset):
            loaded.append(item)
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"PET DICOM file not found: {path}")
        loaded.append(pydicom.dcmread(path, stop_before_pixels=True))
    if not loaded:
        raise SUVError("series_suv_factor: no datasets given")
    reference = _series_signature(loaded[0])
    disagreements = []
    for ds in loaded[1:]:
        signature = _series_signature(ds)
        for key, value in reference.items():
            if signature[key] != value:
                disagreements.append(
                    f"{key} {value!r} in {_label(loaded[:1])} vs {signature[key]!r} in {_label([ds])}"
                )
        if len(disagreements) >= 5:
            break
    if disagreements:
        raise SUVError("series_suv_factor: instances disagree on SUV-relevant tags: " + "; ".join(disagreements))
    return suv_bw_factor(loaded)


def rescale_to_suv(ds: Dataset, factor: SUVFactor | float | None = None) -> np.ndarray:
    """SUVbw image of one PET instance: ``(pixel_array * RescaleSlope + RescaleIntercept) * factor``.

    Args:
        ds: a PET instance with pixel data.
        factor: the series factor (from :func:`series_suv_factor`) or a number; computed from ``ds`` alone when
            None.

    Returns:
        float32 array of SUVbw (g/ml), shape of ``ds.pixel_array``.

    Raises:
        SUVError: no pixel data, or the factor cannot be computed / is not > 0.
    """
    if "PixelData" not in ds:
        raise SUVError(f"{_label([ds])}: no PixelData, cannot compute SUV")
    if factor is None:
        factor = suv_bw_factor(ds)
    value = factor.factor if isinstance(factor, SUVFactor) else float(factor)
    if not (math.isfinite(value) and value > 0):
        raise SUVError(f"{_label([ds])}: SUV factor must be finite and > 0, got {value}")
    slope = float(_text(ds.get("RescaleSlope")) or 1.0)
    intercept = float(_text(ds.get("RescaleIntercept")) or 0.0)
    return ((ds.pixel_array.astype(np.float64) * slope + intercept) * value).astype(np.float32)
