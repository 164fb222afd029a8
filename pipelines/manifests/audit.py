"""Leakage audit of image manifests: subjects shared between splits and duplicate images across splits.

A manifest is a table (pandas DataFrame or CSV) with one row per image and at least the columns ``subject_id``,
``image`` (path), ``split`` (``train``/``val``/``test``; any split names work); ``session_id``, ``label``,
``slice_index`` and extra columns are carried along.

Duplicates are found on decoded pixels, not on file bytes:
    * exact: sha256 of the decoded grey pixel array (dtype, shape and values), so a PNG re-save of a JPEG, or the
      same image with different metadata, is still an exact duplicate;
    * near: 64-bit perceptual hash (pHash: 2D DCT-II of the 32x32 grey Lanczos resize, top-left 8x8
      coefficients thresholded at their median), images linked when their Hamming distance is
      ``<= max_distance``, groups = connected components. Near groups contain the exact ones.

Only 2D images that PIL reads are supported (PNG, JPEG, BMP, TIFF...); colour images are converted to grey
(ITU-R 601 luma, exact for grey stored as RGB).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.fft
from PIL import Image, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipelines.tracking.progress import progress_bar

__all__ = [
    "AuditReport",
    "LeakageError",
    "assert_no_subject_overlap",
    "audit",
    "duplicate_groups",
    "hamming_groups",
    "perceptual_hash",
    "pseudo_subjects",
    "subject_overlap",
]

REQUIRED_COLUMNS = ("subject_id", "image", "split")
_SPLIT_ORDER = ("train", "training", "val", "valid", "validation", "test", "testing")
_MAX_LISTED = 10
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class LeakageError(ValueError):
    """The manifest leaks information between splits (shared subjects or duplicate images)."""


# --------------------------------------------------------------------------------------------------- subjects


def _check_columns(df: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}; it has {list(df.columns)}")
    for column in columns:
        if df[column].isna().any():
            rows = df.index[df[column].isna()].tolist()[:_MAX_LISTED]
            raise ValueError(f"manifest column {column!r} has empty values (rows {rows})")


def _ordered_splits(splits: Iterable[str]) -> list[str]:
    def key(name: str) -> tuple[int, str]:
        low = name.lower()
        return (_SPLIT_ORDER.index(low) if low in _SPLIT_ORDER else len(_SPLIT_ORDER), name)

    return sorted({str(s) for s in splits}, key=key)


def subject_overlap(df: pd.DataFrame) -> dict[str, list[str]]:
    """Subjects present in more than one split.

    Args:
        df: manifest with ``subject_id`` and ``split``.

    Returns:
        ``{"train|test": [subject ids in both], ...}`` for every pair of splits (train, val, test order first,
        other names alphabetically) that shares at least one subject; empty dict when the splits are disjoint.
        Subject ids are compared as strings.
    """
    _check_columns(df, ("subject_id", "split"))
    subjects = df["subject_id"].astype(str)
    splits = df["split"].astype(str)
    per_split = {s: set(subjects[splits == s]) for s in _ordered_splits(splits)}
    names = list(per_split)
    out: dict[str, list[str]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(per_split[a] & per_split[b])
            if shared:
                out[f"{a}|{b}"] = shared
    return out


def assert_no_subject_overlap(df: pd.DataFrame) -> None:
    """Raise if any subject appears in more than one split.

    Raises:
        LeakageError: naming up to 10 shared subject ids with their image counts per split.
    """
    overlap = subject_overlap(df)
    if not overlap:
        return
    ids = sorted(set().union(*overlap.values()))
    subjects = df["subject_id"].astype(str)
    counts = df.assign(_sid=subjects, _split=df["split"].astype(str))[subjects.isin(ids)]
    counts = counts.groupby(["_sid", "_split"]).size()
    order = _ordered_splits(df["split"])
    listed = []
    for sid in ids[:_MAX_LISTED]:
        per = counts.loc[sid]
        listed.append(f"{sid} (" + ", ".join(f"{s}: {int(per[s])}" for s in order if s in per.index) + ")")
    pairs = ", ".join(f"{pair}: {len(v)}" for pair, v in overlap.items())
    more = f"; and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else ""
    raise LeakageError(f"{len(ids)} subject(s) appear in more than one split ({pairs}): "
                       + "; ".join(listed) + more)


# --------------------------------------------------------------------------------------------------- hashing


def _load_grey(path: Path) -> np.ndarray:
    """Decoded grey pixels: uint8 for 8-bit images, the native integer/float array for 16/32-bit grey modes."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return np.asarray(img)
            return np.asarray(img.convert("L"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: image file not found") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


def _pixel_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def perceptual_hash(image: np.ndarray, hash_size: int = 8) -> np.ndarray:
    """pHash bits of a 2D grey image.

    The image is resized to ``(4 * hash_size)^2`` with Lanczos (PIL, float mode), transformed with a 2D DCT-II,
    and the top-left ``hash_size x hash_size`` coefficients (DC included) are compared with their median.

    Args:
        image: 2D array (any real dtype), e.g. uint8 grey levels.
        hash_size: side of the low-frequency block; 8 gives a 64-bit hash. Must be >= 2.

    Returns:
        bool array of shape ``(hash_size, hash_size)``; for generic images half of the bits are set.
    """
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"perceptual_hash expects a 2D grey image, got shape {arr.shape}")
    side = 4 * hash_size
    small = Image.fromarray(arr.astype(np.float32), mode="F").resize((side, side), Image.Resampling.LANCZOS)
    coeffs = scipy.fft.dctn(np.asarray(small, dtype=np.float64), type=2)
    low = coeffs[:hash_size, :hash_size]
    return low > np.median(low)


def hamming_groups(packed: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected components of hashes within ``max_distance`` bits of each other.

    Vectorised XOR + popcount in row blocks (about 4 M pairs a block), so 2,000 hashes take well under a second
    and memory stays bounded for larger sets.

    Args:
        packed: ``(n, n_bytes)`` uint8, one bit-packed hash a row.
        max_distance: largest Hamming distance (bits) that links two hashes, >= 0.

    Returns:
        int64 component label per row, numbered in order of first appearance (0, 1, ...).
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    n = len(packed)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    block = max(1, (1 << 22) // max(n * packed.shape[1], 1))
    rows, cols = [], []
    for start in range(0, n, block):
        part = packed[start:start + block]
        dist = _POPCOUNT[part[:, None, :] ^ packed[None, :, :]].sum(axis=2, dtype=np.int32)
        i, j = np.nonzero(dist <= max_distance)
        keep = j > i + start
        rows.append(i[keep] + start)
        cols.append(j[keep])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _first_appearance(labels)


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    codes, _ = pd.factorize(pd.Series(labels), sort=False)
    return codes.astype(np.int64)


def duplicate_groups(paths: Sequence[str | Path], near: bool = True, hash_size: int = 8,
                     max_distance: int = 4) -> pd.DataFrame:
    """Exact and near-duplicate groups among 2D images.

    Args:
        paths: image files (read with PIL, converted to grey).
        near: also compute perceptual hashes and near-duplicate groups.
        hash_size: pHash block side (8 -> 64 bits).
        max_distance: Hamming distance (bits, out of ``hash_size**2``) at or below which two images are
            near duplicates; 4 of 64 finds re-encoded/rescaled copies while keeping distinct slices apart.

    Returns:
        One row per input path, in input order, with columns ``image`` (as given), ``pixel_hash`` (sha256 hex of
        the decoded grey array), ``phash`` (hex of the packed bits; None if ``near=False``), ``exact_group`` and
        ``near_group`` (component ids numbered by first appearance; every image has one, singletons included;
        ``near_group`` is <NA> if ``near=False``), ``exact_group_size`` and ``near_group_size``.

    Raises:
        FileNotFoundError / ValueError: naming the image that cannot be read.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    paths = list(paths)
    pixel_hashes: list[str] = []
    packed: list[np.ndarray] = []
    for path in progress_bar(paths, desc="hash images", unit="image"):
        arr = _load_grey(Path(path))
        pixel_hashes.append(_pixel_hash(arr))
        if near:
            packed.append(np.packbits(perceptual_hash(arr, hash_size).ravel()))
    out = pd.DataFrame({"image": paths, "pixel_hash": pixel_hashes})
    out["phash"] = [p.tobytes().hex() for p in packed] if near else None
    out["exact_group"] = pd.factorize(out["pixel_hash"], sort=False)[0].astype(np.int64)
    if near and paths:
        out["near_group"] = pd.array(hamming_groups(np.stack(packed), max_distance), dtype="Int64")
    else:
        out["near_group"] = pd.array([pd.NA] * len(paths), dtype="Int64")
    out["exact_group_size"] = out.groupby("exact_group")["image"].transform("size").astype(np.int64)
    out["near_group_size"] = (out.groupby("near_group")["image"].transform("size").astype("Int64") if near
                              else pd.array([pd.NA] * len(paths), dtype="Int64"))
    return out


# --------------------------------------------------------------------------------------------------- audit


def _resolve(image: str, root: Path | None) -> Path:
    path = Path(image)
    return path if root is None or path.is_absolute() else root / path


def _image_groups(df: pd.DataFrame, near: bool, root: str | Path | None, hash_size: int,
                  max_distance: int) -> pd.DataFrame:
    """duplicate_groups over the unique image paths of a manifest, one row per manifest row."""
    root = None if root is None else Path(root)
    unique = pd.unique(df["image"].astype(str))
    groups = duplicate_groups([_resolve(p, root) for p in unique], near=near, hash_size=hash_size,
                              max_distance=max_distance)
    groups["image"] = unique
    return groups.set_index("image").loc[df["image"].astype(str)].reset_index()


@dataclass
class AuditReport:
    """Result of :func:`audit`.

    Attributes:
        n_images: manifest rows.
        n_subjects: distinct subject ids.
        images_per_split / subjects_per_split: counts per split.
        subject_overlap: as :func:`subject_overlap`.
        images_in_several_splits: image paths listed in more than one split (the same file).
        n_exact_groups / n_near_groups: duplicate groups with >= 2 distinct images (near: None if not run).
        n_exact_groups_cross_split / n_near_groups_cross_split: those groups whose rows span > 1 split.
        n_images_in_cross_split_exact / n_images_in_cross_split_near: distinct images in those groups.
        examples: up to ``max_examples`` cross-split groups: kind, group, splits, subjects, images (manifest paths).
        parameters: near, hash_size, max_distance.
        groups: per-row duplicate table (manifest rows + hash/group columns); not serialised.
    """

    n_images: int
    n_subjects: int
    images_per_split: dict[str, int]
    subjects_per_split: dict[str, int]
    subject_overlap: dict[str, list[str]]
    images_in_several_splits: list[str]
    n_exact_groups: int | None
    n_exact_groups_cross_split: int | None
    n_images_in_cross_split_exact: int | None
    n_near_groups: int | None
    n_near_groups_cross_split: int | None
    n_images_in_cross_split_near: int | None
    examples: list[dict[str, Any]]
    parameters: dict[str, Any]
    groups: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def has_leakage(self) -> bool:
        """True if subjects, files, or exact/near-duplicate groups are shared between splits."""
        return bool(self.subject_overlap or self.images_in_several_splits or self.n_exact_groups_cross_split
                    or self.n_near_groups_cross_split)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the ``groups`` table)."""
        d = asdict(self)  # deep-copies groups too; cheap next to hashing
        d.pop("groups")
        d["has_leakage"] = self.has_leakage
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (image paths as written in the manifest)."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_markdown(self) -> str:
        """Human-readable report."""
        na = "not run"
        lines = [
            "# Leakage audit",
            "",
            f"- images: {self.n_images}, subjects: {self.n_subjects}",
            "- per split: " + ", ".join(f"{s}: {self.images_per_split[s]} images / {self.subjects_per_split[s]} "
                                        f"subjects" for s in self.images_per_split),
            f"- verdict: **{'LEAKAGE FOUND' if self.has_leakage else 'no leakage found'}**",
            "",
            "| check | result |",
            "|---|---|",
            "| subjects in more than one split | "
            + (", ".join(f"{k}: {len(v)}" for k, v in self.subject_overlap.items()) or "none") + " |",
            f"| same image file in more than one split | {len(self.images_in_several_splits)} |",
            f"| exact-duplicate groups (all / across splits) | "
            f"{na if self.n_exact_groups is None else self.n_exact_groups} / "
            f"{na if self.n_exact_groups_cross_split is None else self.n_exact_groups_cross_split} |",
            f"| images in cross-split exact groups | "
            f"{na if self.n_images_in_cross_split_exact is None else self.n_images_in_cross_split_exact} |",
            f"| near-duplicate groups (all / across splits) | "
            f"{na if self.n_near_groups is None else self.n_near_groups} / "
            f"{na if self.n_near_groups_cross_split is None else self.n_near_groups_cross_split} |",
            f"| images in cross-split near groups | "
            f"{na if self.n_images_in_cross_split_near is None else self.n_images_in_cross_split_near} |",
            "",
            f"Parameters: {', '.join(f'{k}={v}' for k, v in self.parameters.items())}.",
        ]
        for pair, ids in self.subject_overlap.items():
            listed = ", ".join(ids[:_MAX_LISTED]) + (f" (+{len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED
                                                     else "")
            lines.append(f"\nShared subjects {pair}: {listed}")
        if self.examples:
            lines += ["", "## Example cross-split duplicate groups", ""]
            for ex in self.examples:
                lines.append(f"- {ex['kind']} group {ex['group']} ({', '.join(ex['splits'])}): "
                             + ", ".join(f"`{p}`" for p in ex["images"]))
        return "\n".join(lines) + "\n"


def _cross_split(table: pd.DataFrame, column: str) -> tuple[int, int, int, list[int]]:
    """(groups with >= 2 distinct images, of them spanning > 1 split, distinct images in those, their ids)."""
    per = table.groupby(column).agg(n_images=("image", "nunique"), n_splits=("split", "nunique"))
    dup = per[per["n_images"] > 1]
    cross = dup[dup["n_splits"] > 1]
    return len(dup), len(cross), int(cross["n_images"].sum()), [int(g) for g in cross.index]


def audit(df: pd.DataFrame | str | Path, near: bool = True, root: str | Path | None = None,
          check_images: bool = True, hash_size: int = 8, max_distance: int = 4,
          max_examples: int = 10) -> AuditReport:
    """Audit a manifest for subject overlap and duplicate images across splits.

    Args:
        df: manifest DataFrame, or a CSV/TSV path.
        near: also look for near duplicates (pHash).
        root: folder that relative ``image`` paths are relative to (default: as written, i.e. the CWD).
        check_images: hash the images (False: subject checks only).
        hash_size, max_distance: see :func:`duplicate_groups`.
        max_examples: cross-split groups listed in the report (exact first).

    Returns:
        An :class:`AuditReport`; it never raises on leakage (use ``report.has_leakage`` or
        :func:`assert_no_subject_overlap`).
    """
    if isinstance(df, (str, Path)):
        df = pd.read_csv(df, sep="\t" if str(df).endswith(".tsv") else ",")
    _check_columns(df, REQUIRED_COLUMNS)
    # a manifest that was audited before carries group columns of its own: recompute them
    df = df.drop(columns=[c for c in ("exact_group", "near_group", "exact_group_size", "near_group_size",
                                      "pixel_hash", "phash") if c in df.columns])
    table = df.assign(split=df["split"].astype(str), subject_id=df["subject_id"].astype(str),
                      image=df["image"].astype(str)).reset_index(drop=True)
    order = _ordered_splits(table["split"])
    per_file = table.groupby("image")["split"].nunique()
    report = AuditReport(
        n_images=len(table),
        n_subjects=int(table["subject_id"].nunique()),
        images_per_split={s: int((table["split"] == s).sum()) for s in order},
        subjects_per_split={s: int(table.loc[table["split"] == s, "subject_id"].nunique()) for s in order},
        subject_overlap=subject_overlap(table),
        images_in_several_splits=sorted(per_file.index[per_file > 1]),
        n_exact_groups=None, n_exact_groups_cross_split=None, n_images_in_cross_split_exact=None,
        n_near_groups=None, n_near_groups_cross_split=None, n_images_in_cross_split_near=None,
        examples=[],
        parameters={"near": near, "hash_size": hash_size, "max_distance": max_distance,
                    "check_images": check_images},
    )
    if not check_images:
        return report
    groups = _image_groups(table, near, root, hash_size, max_distance)
    table = pd.concat([table, groups.drop(columns="image")], axis=1)
    report.groups = table
    kinds = [("exact", "exact_group")] + ([("near", "near_group")] if near else [])
    for kind, column in kinds:
        n_dup, n_cross, n_img, ids = _cross_split(table, column)
        setattr(report, f"n_{kind}_groups", n_dup)
        setattr(report, f"n_{kind}_groups_cross_split", n_cross)
        setattr(report, f"n_images_in_cross_split_{kind}", n_img)
        shown = {tuple(sorted(ex["images"])) for ex in report.examples}
        for gid in ids:
            if len(report.examples) >= max_examples:
                break
            rows = table[table[column] == gid]
            images = sorted(pd.unique(rows["image"]))
            if tuple(images) in shown:
                continue
            report.examples.append({
                "kind": kind, "group": gid, "splits": _ordered_splits(rows["split"]),
                "subjects": sorted(pd.unique(rows["subject_id"])), "images": images,
            })
    return report


# --------------------------------------------------------------------------------------------------- remedy


def pseudo_subjects(df: pd.DataFrame, groups_col: str = "near_group", root: str | Path | None = None,
                    prefix: str = "dup-", hash_size: int = 8, max_distance: int = 4) -> pd.DataFrame:
    """Merge subjects linked by duplicate images so a subject-level split keeps duplicates on one side.

    Subjects are nodes; every duplicate group (``groups_col`` value shared by >= 2 rows) links the subjects of its
    rows. Each connected set of two or more subjects gets one new id ``<prefix><n>`` (n by first appearance), for
    all of its rows, so both the duplicates and the other images of those subjects stay together; subjects
    not linked to another subject keep their id.

    Args:
        df: manifest with ``subject_id`` and ``image``; if ``groups_col`` is absent it is computed with
            :func:`duplicate_groups` (near groups for ``"near_group"``, else exact groups).
        groups_col: column holding the duplicate group ids (e.g. from :func:`audit`'s ``report.groups``).
        root: folder for relative image paths when groups are computed here.
        prefix: prefix of the merged ids; a number is skipped if the id already exists.

    Returns:
        A copy with ``subject_id`` rewritten, the original in ``orig_subject_id``, and ``groups_col`` added if it
        was computed.
    """
    _check_columns(df, ("subject_id", "image"))
    out = df.copy()
    if groups_col not in out.columns:
        near = groups_col == "near_group"
        groups = _image_groups(out.reset_index(drop=True), near, root, hash_size, max_distance)
        column = "near_group" if near else "exact_group"
        out[groups_col] = groups[column].to_numpy()
    subjects = out["subject_id"].astype(str).to_numpy()
    codes, uniques = pd.factorize(pd.Series(subjects), sort=False)
    group_codes = pd.factorize(out[groups_col], sort=False, use_na_sentinel=True)[0]
    valid = group_codes >= 0
    # bipartite graph subjects <-> groups; components give the merged subject sets
    n_sub, n_grp = len(uniques), int(group_codes.max()) + 1 if valid.any() else 0
    graph = coo_matrix((np.ones(int(valid.sum()), dtype=np.int8), (codes[valid], n_sub + group_codes[valid])),
                       shape=(n_sub + n_grp, n_sub + n_grp))
    _, labels = connected_components(graph, directed=False)
    sub_labels = labels[:n_sub]
    sizes = np.bincount(sub_labels, minlength=labels.max() + 1)
    existing = set(uniques)
    new_ids: dict[int, str] = {}
    counter = 0
    for code in codes:  # first appearance order
        lab = sub_labels[code]
        if sizes[lab] > 1 and lab not in new_ids:
            while f"{prefix}{counter}" in existing:
                counter += 1
            new_ids[lab] = f"{prefix}{counter}"
            counter += 1
    out["orig_subject_id"] = out["subject_id"]
    out["subject_id"] = [new_ids.get(sub_labels[c], orig) for c, orig in zip(codes, out["orig_subject_id"])]
    return out
