"""Dataset readers on small fake trees of every layout, plus MVTec AD bottle when present."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.bench.datasets import DATASETS, DatasetError, Sample, list_categories, load_samples

SHARED_MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def write_image(path: Path) -> Path:
    """A tiny real image file, so readers see the same bytes a benchmark would hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((4, 4), 255, dtype=np.uint8))
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def summary(samples: list[Sample], root: Path) -> list[tuple[str, int, str, str | None]]:
    """Samples as root-relative tuples, easy to compare against a literal."""
    return [
        (
            s.path.relative_to(root).as_posix(),
            s.label,
            s.defect,
            s.mask_path.relative_to(root).as_posix() if s.mask_path else None,
        )
        for s in samples
    ]


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    for name in ("test/good/000.png", "test/good/001.png", "test/crack/000.png"):
        write_image(root / "bottle" / name)
    write_image(root / "bottle/test/crack/001.png")
    write_image(root / "bottle/ground_truth/crack/000_mask.png")
    write_text(root / "bottle/test/good/.hidden.png", "")
    write_text(root / "bottle/test/good/notes.txt", "not an image")
    write_image(root / "cable/test/good/000.png")
    (root / "empty/test").mkdir(parents=True)
    (root / "docs").mkdir()
    write_text(root / "license.txt", "")
    return root


def test_mvtec_samples(mvtec_root: Path) -> None:
    samples = load_samples("mvtec", mvtec_root, "bottle")
    assert summary(samples, mvtec_root) == [
        ("bottle/test/crack/000.png", 1, "crack", "bottle/ground_truth/crack/000_mask.png"),
        ("bottle/test/crack/001.png", 1, "crack", None),
        ("bottle/test/good/000.png", 0, "good", None),
        ("bottle/test/good/001.png", 0, "good", None),
    ]


def test_mvtec_categories(mvtec_root: Path) -> None:
    assert list_categories("mvtec", mvtec_root) == ["bottle", "cable", "empty"]


def test_samples_are_deterministic(mvtec_root: Path) -> None:
    first = load_samples("mvtec", mvtec_root, "bottle")
    assert first == load_samples("mvtec", mvtec_root, "bottle")
    assert [s.path for s in first] == sorted(s.path for s in first)


def test_visa_folders(tmp_path: Path) -> None:
    data = tmp_path / "candle" / "Data"
    write_image(data / "Images/Normal/0000.JPG")
    write_image(data / "Images/Anomaly/000.JPG")
    write_image(data / "Images/Anomaly/001.JPG")
    write_image(data / "Masks/Anomaly/000.png")
    (tmp_path / "split_csv").mkdir()
    assert list_categories("visa", tmp_path) == ["candle"]
    assert summary(load_samples("visa", tmp_path, "candle"), tmp_path) == [
        ("candle/Data/Images/Anomaly/000.JPG", 1, "anomaly", "candle/Data/Masks/Anomaly/000.png"),
        ("candle/Data/Images/Anomaly/001.JPG", 1, "anomaly", None),
        ("candle/Data/Images/Normal/0000.JPG", 0, "good", None),
    ]


VISA_CSV = """object,split,label,image,mask
candle,train,normal,candle/Data/Images/Normal/0000.JPG,
candle,test,normal,candle/Data/Images/Normal/0001.JPG,
candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png
fryum,test,normal,fryum/Data/Images/Normal/0000.JPG,
"""


@pytest.fixture
def visa_csv_root(tmp_path: Path) -> Path:
    for name in ("Normal/0000.JPG", "Normal/0001.JPG", "Anomaly/000.JPG", "Anomaly/001.JPG"):
        write_image(tmp_path / "candle/Data/Images" / name)
    write_image(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    write_image(tmp_path / "fryum/Data/Images/Normal/0000.JPG")
    write_text(tmp_path / "split_csv/1cls.csv", VISA_CSV)
    return tmp_path


def test_visa_split_csv_selects_test_rows(visa_csv_root: Path) -> None:
    assert list_categories("visa", visa_csv_root) == ["candle", "fryum"]
    assert summary(load_samples("visa", visa_csv_root, "candle"), visa_csv_root) == [
        ("candle/Data/Images/Anomaly/000.JPG", 1, "anomaly", "candle/Data/Masks/Anomaly/000.png"),
        ("candle/Data/Images/Normal/0001.JPG", 0, "good", None),
    ]


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        (VISA_CSV.replace("Normal/0001.JPG", "Normal/9999.JPG"), "does not exist"),
        (VISA_CSV.replace("test,anomaly", "test,broken"), "expected normal or anomaly"),
        (VISA_CSV.replace("object,split", "category,split"), "lacks columns object"),
    ],
)
def test_visa_split_csv_errors(visa_csv_root: Path, csv_text: str, message: str) -> None:
    write_text(visa_csv_root / "split_csv/1cls.csv", csv_text)
    with pytest.raises(DatasetError, match=message):
        load_samples("visa", visa_csv_root, "candle")


def test_visa_split_csv_unknown_category(visa_csv_root: Path) -> None:
    write_image(visa_csv_root / "pcb1/Data/Images/Normal/0000.JPG")
    with pytest.raises(DatasetError, match="found candle, fryum"):
        load_samples("visa", visa_csv_root, "pcb1")


def test_btad_samples(tmp_path: Path) -> None:
    base = tmp_path / "01"
    write_image(base / "test/ok/0000.bmp")
    for name in ("0000.bmp", "0001.png", "0002.bmp"):
        write_image(base / "test/ko" / name)
    write_image(base / "ground_truth/ko/0000.png")
    write_image(base / "ground_truth/ko/0001.bmp")
    assert list_categories("btad", tmp_path) == ["01"]
    assert summary(load_samples("btad", tmp_path, "01"), tmp_path) == [
        ("01/test/ko/0000.bmp", 1, "ko", "01/ground_truth/ko/0000.png"),
        ("01/test/ko/0001.png", 1, "ko", "01/ground_truth/ko/0001.bmp"),
        ("01/test/ko/0002.bmp", 1, "ko", None),
        ("01/test/ok/0000.bmp", 0, "good", None),
    ]


def test_folder_samples(tmp_path: Path) -> None:
    root = tmp_path / "line3"
    write_image(root / "good/a.PNG")
    write_image(root / "good/b.tif")
    for name in ("c.jpg", "d.png", "e.png"):
        write_image(root / "scratch" / name)
    write_image(root / "ground_truth/scratch/c.png")
    write_image(root / "ground_truth/scratch/d_mask.png")
    write_text(root / "good/readme.md", "")
    assert list_categories("folder", root) == ["line3"]
    assert summary(load_samples("folder", root, "ignored"), root) == [
        ("good/a.PNG", 0, "good", None),
        ("good/b.tif", 0, "good", None),
        ("scratch/c.jpg", 1, "scratch", "ground_truth/scratch/c.png"),
        ("scratch/d.png", 1, "scratch", "ground_truth/scratch/d_mask.png"),
        ("scratch/e.png", 1, "scratch", None),
    ]


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=", ".join(DATASETS)):
        load_samples("mvtec_ad", tmp_path, "bottle")
    with pytest.raises(DatasetError, match="unknown dataset"):
        list_categories("kolektor", tmp_path)


@pytest.mark.parametrize("dataset", DATASETS)
def test_missing_root(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_samples(dataset, tmp_path / "nowhere", "bottle")


def test_unknown_category_lists_found(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"'tile'.*found bottle, cable, empty"):
        load_samples("mvtec", mvtec_root, "tile")


def test_unknown_category_when_none_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="found none"):
        load_samples("btad", tmp_path, "01")


@pytest.mark.parametrize("category", ["empty", "docs"])
def test_category_without_images(mvtec_root: Path, category: str) -> None:
    with pytest.raises(DatasetError, match=r"no images under .*: expected .*/test/<good\|defect>"):
        load_samples("mvtec", mvtec_root, category)


def test_folder_without_images(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match=r"no images under .*: expected .*/good/\*\.png"):
        load_samples("folder", tmp_path, "")


def test_real_mvtec_bottle() -> None:
    if not SHARED_MVTEC.is_dir():
        pytest.skip(f"shared data is missing: no MVTec AD at {SHARED_MVTEC}")
    samples = load_samples("mvtec", SHARED_MVTEC, "bottle")
    anomalous = [s for s in samples if s.label == 1]
    assert len(samples) == 83
    assert sum(s.label == 0 for s in samples) == 20
    assert len(anomalous) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in anomalous)
    assert {s.defect for s in anomalous} == {"broken_large", "broken_small", "contamination"}
    assert "bottle" in list_categories("mvtec", SHARED_MVTEC)
