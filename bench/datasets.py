"""Readers for the test splits of anomaly-detection benchmarks and of plain image folders.

Each reader turns one on-disk layout into a sorted list of `Sample`s so that evaluation
code never needs to know where images or masks live. Layout problems surface as one-line
`DatasetError`s that say what to fix; a defective image without a mask is allowed (its
`mask_path` is None) because image-level metrics remain meaningful without masks.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from musc_edge.errors import MuscEdgeError
from musc_edge.images import list_images

DATASETS = ("mvtec", "visa", "btad", "folder")
GOOD = "good"
VISA_DEFECT = "anomaly"
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_CSV_LABELS = {"normal": 0, "anomaly": 1}

LAYOUTS = {
    "mvtec": "{base}/test/<good|defect>/*.png, masks in {base}/ground_truth/<defect>/*_mask.png",
    "visa": "{base}/Data/Images/{{Normal,Anomaly}}/*.JPG, masks in {base}/Data/Masks/Anomaly/",
    "btad": "{base}/test/{{ok,ko}}/*.bmp or *.png, masks in {base}/ground_truth/ko/",
    "folder": "{base}/good/*.png and {base}/<defect>/*.png, masks optional in "
    "{base}/ground_truth/<defect>/",
}


@dataclass(frozen=True)
class Sample:
    """One test image with its ground truth, as evaluation consumes it."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect type
    mask_path: Path | None  # None for normal images or when no mask exists


class DatasetError(MuscEdgeError, ValueError):
    """A dataset root, category or layout that cannot be read; the message says what to fix."""


def _images(folder: Path) -> list[Path]:
    """Visible image files directly inside `folder`, none when it does not exist."""
    return list_images(folder, recursive=False)


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders of `folder`, none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_existing(candidates: Iterable[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _sample(image: Path, defect: str, mask_candidates: Iterable[Path]) -> Sample:
    """A sample labelled by its folder; only anomalous images look for a mask."""
    if defect == GOOD:
        return Sample(image, 0, GOOD, None)
    return Sample(image, 1, defect, _first_existing(mask_candidates))


def _mvtec_samples(base: Path) -> list[Sample]:
    truth = base / "ground_truth"
    return [
        _sample(image, folder.name, [truth / folder.name / f"{image.stem}_mask.png"])
        for folder in _subdirs(base / "test")
        for image in _images(folder)
    ]


def _btad_samples(base: Path) -> list[Sample]:
    masks = base / "ground_truth" / "ko"
    good = [_sample(image, GOOD, []) for image in _images(base / "test" / "ok")]
    bad = [
        _sample(image, "ko", [masks / f"{image.stem}.png", masks / f"{image.stem}.bmp"])
        for image in _images(base / "test" / "ko")
    ]
    return good + bad


def _visa_folder_samples(base: Path) -> list[Sample]:
    images = base / "Data" / "Images"
    masks = base / "Data" / "Masks" / "Anomaly"
    good = [_sample(image, GOOD, []) for image in _images(images / "Normal")]
    bad = [
        _sample(image, VISA_DEFECT, [masks / f"{image.stem}.png"])
        for image in _images(images / "Anomaly")
    ]
    return good + bad


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    """The rows of VisA's split file, checked for the columns the reader relies on."""
    path = root / VISA_SPLIT_CSV
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in VISA_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{path} lacks columns {', '.join(missing)}: expected {','.join(VISA_CSV_COLUMNS)}"
            )
        return list(reader)


def _visa_csv_sample(root: Path, row: dict[str, str]) -> Sample:
    csv_path = root / VISA_SPLIT_CSV
    image = root / row["image"]
    if not image.is_file():
        raise DatasetError(
            f"{csv_path} lists {image}, which does not exist: point root at the VisA folder "
            "that holds split_csv/ and the category folders"
        )
    label = VISA_CSV_LABELS.get(row["label"].strip().lower())
    if label is None:
        raise DatasetError(
            f"{csv_path} has label {row['label']!r} for {row['image']}: expected normal or anomaly"
        )
    if label == 0:
        return _sample(image, GOOD, [])
    mask = row["mask"].strip()
    return _sample(image, VISA_DEFECT, [root / mask] if mask else [])


def _visa_csv_samples(root: Path, category: str) -> list[Sample]:
    return [
        _visa_csv_sample(root, row)
        for row in _read_visa_csv(root)
        if row["split"] == "test" and row["object"] == category
    ]


def _folder_samples(root: Path) -> list[Sample]:
    samples = []
    for folder in _subdirs(root):
        if folder.name == "ground_truth":
            continue
        masks = root / "ground_truth" / folder.name
        samples += [
            _sample(
                image, folder.name, [masks / f"{image.stem}.png", masks / f"{image.stem}_mask.png"]
            )
            for image in _images(folder)
        ]
    return samples


def _has_visa_csv(root: Path) -> bool:
    return (root / VISA_SPLIT_CSV).is_file()


def _categories_with(root: Path, marker: Path) -> list[str]:
    """Subfolders of root that contain `marker`, which tells categories from other files."""
    return [d.name for d in _subdirs(root) if (d / marker).is_dir()]


def _visa_categories(root: Path) -> list[str]:
    if _has_visa_csv(root):
        return sorted({row["object"] for row in _read_visa_csv(root) if row["split"] == "test"})
    return _categories_with(root, Path("Data") / "Images")


CATEGORY_FINDERS: dict[str, Callable[[Path], list[str]]] = {
    "mvtec": lambda root: _categories_with(root, Path("test")),
    "visa": _visa_categories,
    "btad": lambda root: _categories_with(root, Path("test")),
    "folder": lambda root: [root.name],
}


def _check_dataset(dataset: str, root: Path) -> None:
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist: pass the folder of the dataset")


def _check_category(dataset: str, root: Path, category: str) -> None:
    """Reject a category that is not there, listing those that are."""
    known = (
        category in _visa_categories(root)
        if dataset == "visa" and _has_visa_csv(root)
        else (root / category).is_dir()
    )
    if not known:
        found = ", ".join(list_categories(dataset, root)) or "none"
        raise DatasetError(f"no category {category!r} under {root}: found {found}")


def _read_samples(dataset: str, root: Path, category: str) -> list[Sample]:
    if dataset == "folder":
        return _folder_samples(root)
    if dataset == "visa" and _has_visa_csv(root):
        return _visa_csv_samples(root, category)
    base = root / category
    readers = {"mvtec": _mvtec_samples, "visa": _visa_folder_samples, "btad": _btad_samples}
    return readers[dataset](base)


def list_categories(dataset: str, root: Path) -> list[str]:
    """Sorted category names found under root, for choosing what to evaluate."""
    root = Path(root)
    _check_dataset(dataset, root)
    return sorted(CATEGORY_FINDERS[dataset](root))


def load_samples(dataset: str, root: Path, category: str) -> list[Sample]:
    """The test samples of one category, sorted by path so runs are reproducible.

    For the "folder" dataset the category is ignored: root itself holds good/ and one
    subfolder per defect type.
    """
    root = Path(root)
    _check_dataset(dataset, root)
    if dataset != "folder":
        _check_category(dataset, root, category)
    samples = _read_samples(dataset, root, category)
    if not samples:
        base = root if dataset == "folder" else root / category
        raise DatasetError(f"no images under {base}: expected {LAYOUTS[dataset].format(base=base)}")
    return sorted(samples, key=lambda s: s.path)
