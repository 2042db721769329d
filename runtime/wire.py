"""What crosses the network between a station (`run --remote`) and the plant's scoring service.

A station sends each batch as the 8-bit images resized to the backbone's size, in one `.npz`
body (`images`, and `previous`: the line's last batch when this one is too small to be judged
alone, as `run` compares it); a third of the float tensor's bytes and smaller than most camera
files (measured in docs/deployment.md). The service answers with JSON: per image the scores,
the guard's flag, how many images it was compared with and the small patch and heat maps the
station draws its overlays and masks from, plus the model and calibration it used, which the
station checks against the line's description (`LineSpec`) before it records anything.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from musc_edge.runtime.scoring import Answer, Item

NPZ_TYPE = "application/x-npz"


@dataclass(frozen=True)
class LineSpec:
    """A served line as its stations see it: what to send, and how to judge the answers."""

    line: str
    model_sha256: str
    backbone: str
    preprocess: dict[str, Any]  # the package's Preprocess: the station resizes with it
    region: list[int] | None  # the calibration's box (x, y, w, h): the station cuts it
    calibration_sha256: str | None
    judge: dict[str, Any] | None  # a calibrated judge's numbers (verdicts.CalibratedJudge)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LineSpec:
        """From the service's reply (which also names its node and replica)."""
        return cls(**{field.name: data[field.name] for field in fields(cls)})


def encode_batch(images: list[np.ndarray], previous: list[np.ndarray]) -> bytes:
    """A batch's resized 8-bit images (and the previous batch's) as one .npz body."""
    body = io.BytesIO()
    np.savez(body, images=np.stack(images), previous=stacked(previous, images[0]))
    return body.getvalue()


def stacked(images: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, *like.shape), like.dtype)


def decode_batch(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images, previous) from a request body; ValueError when it is not one."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as data:
            images, previous = data["images"], data["previous"]
    except (OSError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"not a batch of images ({error})") from None
    for name, array in (("images", images), ("previous", previous)):
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(
                f"{name}: expected (N, H, W, 3) uint8, got {array.dtype} {array.shape}"
            )
    if len(images) == 0:
        raise ValueError("images: the batch is empty")
    return images, previous


def answer_numbers(answer: Answer) -> dict[str, Any]:
    """An answer's scores and flags, the fields the verdict is made from."""
    return {
        "score": answer.score,
        "raw_score": answer.raw_score,
        "reference_score": answer.reference_score,
        "repeated": answer.repeated,
        "compared": answer.compared,
        "warning": answer.warning,
    }


def answer_to_json(answer: Answer) -> dict[str, Any]:
    """One image's answer; the maps as nested lists (a few hundred numbers each)."""
    return {
        **answer_numbers(answer),
        "patch_map": answer.patch_map.float().cpu().tolist(),
        "heat": np.asarray(answer.heat, np.float32).tolist(),
    }


def optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def answer_from_json(item: Item, data: dict[str, Any]) -> Answer:
    """The station's answer for its `item` from the service's JSON."""
    return Answer(
        item,
        float(data["score"]),
        optional_float(data["raw_score"]),
        optional_float(data["reference_score"]),
        torch.tensor(data["patch_map"], dtype=torch.float32),
        np.asarray(data["heat"], np.float32),
        repeated=bool(data["repeated"]),
        warning=data["warning"],
        compared=int(data["compared"]),
    )
