"""Teach-in: a bank of known-good parts, their score distribution and a threshold, in one file.

A calibration is what lets a verdict mean the same thing on Monday and on Friday. It holds the
known-good parts' pooled features (they join every batch and window as references, and each
scored patch is measured against them), the leave-one-out scores of those parts (each one
against all the others: what a good part scores) and the threshold for a target false-reject
rate. It is bound to the model package it was made with: features of another backbone, size,
preprocessing or MuSc setting mean nothing against it.

The file is safetensors (no pickle): the pooled sets in float16 and the embeddings, with the
rest as JSON in the header's metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from musc_edge.coreset import k_centre
from musc_edge.errors import MuscEdgeError
from musc_edge.files import write_atomic
from musc_edge.msm.nearest import nearest_distances
from musc_edge.musc import AlignedSpread, MuSc, References
from musc_edge.package import ModelPackage
from musc_edge.region import Region

FORMAT = "musc-edge-calibration"
FORMAT_VERSION = 2  # 2: an optional coreset bank (bank_i) and at most MAX_VOTERS voters
READABLE_VERSIONS = (1, 2)
STORED_DTYPE = torch.float16  # unit vectors; the scores are computed from the stored values
EULER_GAMMA = 0.5772156649
MIN_PARTS = 5
CONFIDENCE = 0.95  # of the stated bound on the false-reject rate
SPREAD_FLOOR = 1e-3  # distance units: a position that never varies still has some spread
# The bank, per pooled set: the CORESET fraction of the good patches (greedy k-centre), at
# most BANK_PATCHES. A part's scoring costs its patches times the bank's against a backbone
# pass of about its patches, so the cap bounds scoring / backbone whatever the input size
# (about 0.3 at most on a 2-core CPU in fp32); chosen from `bench bank` (docs/benchmarks.md).
BANK_PATCHES = 2048
CORESET = 0.25
MAX_VOTERS = 32  # good parts that join MSM as references (the bank keeps all parts' patches)


class CalibrationError(MuscEdgeError, ValueError):
    """A calibration that cannot be made or used; the message says what to do."""


def frr_upper_bound(exceeding: int, parts: int, confidence: float = CONFIDENCE) -> float:
    """The false-reject rate that `exceeding` of `parts` held-out good parts above the
    threshold rule out at `confidence` (Clopper-Pearson, one-sided): what the parts show,
    whatever the shape of the score distribution the threshold was fitted with."""
    if exceeding >= parts:
        return 1.0

    def at_most_seen(rate: float) -> float:  # P(no more than `exceeding` of `parts` exceed)
        return sum(
            math.comb(parts, k) * rate**k * (1 - rate) ** (parts - k) for k in range(exceeding + 1)
        )

    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: at_most_seen falls as the rate grows
        middle = (low + high) / 2
        low, high = (middle, high) if at_most_seen(middle) > 1 - confidence else (low, middle)
    return high


def parts_for_target(target_frr: float, confidence: float = CONFIDENCE) -> int:
    """Held-out good parts, none above the threshold, that show the target rate at
    `confidence` (1 % at 95 %: 299; the "rule of three")."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - target_frr))


def threshold_confidence(exceeding: int, parts: int, calibration: Calibration) -> dict:
    """How sure the threshold is: the bound on the false-reject rate the held-out scores
    allow, and how many parts would make the target sure."""
    return {
        "confidence": CONFIDENCE,
        "frr_upper_bound": frr_upper_bound(exceeding, parts),
        "parts_for_target": parts_for_target(calibration.target_frr),
    }


def gumbel_threshold(scores: torch.Tensor, target_frr: float) -> float:
    """The score a good part exceeds with probability `target_frr`.

    An image score is the maximum over many patch distances, and maxima follow a Gumbel law;
    its location and scale are fitted by moments to the good parts' scores. Measured on
    bottle, a normal fit put the threshold below a quarter of the unseen good parts, this one
    below none (docs/verdicts.md).
    """
    values = scores.double()
    scale = float(values.std()) * math.sqrt(6) / math.pi
    location = float(values.mean()) - EULER_GAMMA * scale
    return location - scale * math.log(-math.log(1 - target_frr))


@dataclass
class Calibration:
    """A known-good bank bound to a package, with the threshold derived from it."""

    binding: dict
    files: list[str]
    sets: list[torch.Tensor]  # (V, L, C) per (layer, r), float16: the voters' (V <= MAX_VOTERS)
    embeddings: torch.Tensor  # (V, D)
    mutual_scores: torch.Tensor  # (V,) raw MSM scores among the voters (RsCIN needs them)
    scores: torch.Tensor  # (R,) leave-one-out distance of each of the R parts to the others
    target_frr: float
    threshold: float
    info: dict = field(default_factory=dict)  # when and from where, for people
    aligned_spread: AlignedSpread | None = None  # --aligned: scores in multiples of the threshold
    bank: list[torch.Tensor] | None = None  # (M, C) per set: a coreset; None: the voters' patches

    def __len__(self) -> int:
        return len(self.files)

    @property
    def aligned(self) -> bool:
        return self.aligned_spread is not None

    def references(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> References:
        """The bank as MuSc references (voters that receive no score), in MSM's precision, on
        the device that scores."""
        sets = [z.to(device, dtype) for z in self.sets]
        bank = None if self.bank is None else [b.to(device, dtype) for b in self.bank]
        return References(
            sets,
            self.embeddings.to(device),
            self.mutual_scores.to(device),
            self.aligned_spread,
            bank,
        )

    def summary(self) -> dict:
        """What the terminal and the docs report: parts, score spread, threshold, rates."""
        scores = self.scores.double()
        return {
            "parts": len(self),
            "voters": self.sets[0].shape[0],
            "bank_patches": len(self.bank[0]) if self.bank else self.sets[0][:, :, 0].numel(),
            "aligned": self.aligned,
            "score_median": float(scores.median()),
            "score_min": float(scores.min()),
            "score_max": float(scores.max()),
            "threshold": self.threshold,
            "target_frr": self.target_frr,
            "leave_one_out_frr": float((scores > self.threshold).double().mean()),
            **threshold_confidence(int((scores > self.threshold).sum()), len(self), self),
        }

    def check_binding(self, package: ModelPackage, source: Path | str) -> None:
        """Refuse a calibration made with another package, saying which setting differs."""
        self.check_settings(package.binding(), source, f"the model package {package.folder}")

    def check_region(self, region: Region | None, source: Path | str) -> None:
        """Refuse a calibration cut from another box of the image than the line's."""
        made = self.info.get("region")
        wanted = None if region is None else region.to_json()
        if made != wanted:

            def box(value: list[int] | None) -> str:
                return "whole images" if value is None else f"region {Region.parse(value)}"

            raise CalibrationError(
                f"calibration {source} was made on {box(made)}, the line scores {box(wanted)}; "
                "calibrate again with the line's --region"
            )

    def check_settings(self, expected: dict, source: Path | str, against: str) -> None:
        """Refuse a calibration whose binding differs from `expected` in any of its keys."""
        expected = json.loads(json.dumps(expected))  # as stored: tuples become lists
        differs = [key for key in expected if self.binding.get(key) != expected[key]]
        if differs:
            raise CalibrationError(
                f"calibration {source} was made for another model ({', '.join(differs)} "
                f"differ from {against}); run `musc-edge calibrate` again with it"
            )


def calibrate(
    package: ModelPackage,
    musc: MuSc,
    tokens: list[torch.Tensor],
    embeddings: torch.Tensor,
    files: list[str],
    target_frr: float = 0.01,
    aligned: bool = False,
    bank_patches: int = BANK_PATCHES,
    coreset: float = CORESET,
) -> Calibration:
    """A calibration from the known-good parts' backbone outputs.

    `aligned` (parts held in a fixture): each position is judged against its own spread on
    the good parts, which also catches a defect that repeats at one place (docs/verdicts.md).
    The bank keeps the `coreset` fraction of the good patches per set, at most
    `bank_patches`, chosen by greedy k-centre (1.0 and few parts: all of them); each part's
    held-out score is measured against the bank less its own patches; at most
    MAX_VOTERS parts, evenly spread over the given ones, join MSM as references.
    """
    if not 0 < target_frr < 1:
        raise CalibrationError(f"--target-frr must be between 0 and 1, got {target_frr}")
    if len(files) < MIN_PARTS:
        raise CalibrationError(
            f"a calibration needs at least {MIN_PARTS} known-good parts, got {len(files)}"
        )
    if bank_patches < 1:
        raise CalibrationError(f"--bank-size must be at least 1 patch, got {bank_patches}")
    if not 0 < coreset <= 1:
        raise CalibrationError(f"--coreset must be a fraction in (0, 1], got {coreset}")
    sets = [z.to(STORED_DTYPE) for z in musc.pool(tokens)]
    voters = voter_indices(len(files))
    mutual = musc.score([t[voters] for t in tokens], embeddings[voters]).raw_scores
    count, patches = sets[0].shape[:2]
    flat = [z.reshape(count * patches, -1) for z in sets]
    chosen = torch.arange(count * patches)  # every part's patches, not only the voters'
    kept = min(bank_patches, math.ceil(coreset * count * patches))
    if count * patches > kept:
        chosen = k_centre(sets, kept)
    bank, origin = [z[chosen] for z in flat], chosen // patches
    held_out = [
        nearest_distances(
            z,
            bank[index],
            musc.precision.dtype,
            musc.budget_bytes,
            leave_out=True,
            origin=origin,
        ).float()
        for index, z in enumerate(sets)
    ]
    distances = (sum(held_out) / len(held_out)).amax(dim=1)
    spread_model, scores, threshold = None, distances, gumbel_threshold(distances, target_frr)
    if aligned:  # two tests at half the rate each: the overall rate stays the target
        deviations = held_out_deviations(held_out)
        centre, spread = aligned_spread_of(held_out)
        spread_model = AlignedSpread(
            centre,
            spread,
            gumbel_threshold(distances, target_frr / 2),
            gumbel_threshold(deviations, target_frr / 2),
        )
        scores = spread_model.combine(distances, deviations)
        threshold = 1.0
    return Calibration(
        package.binding(),
        files,
        [z[voters] for z in sets],
        embeddings[voters].float(),
        mutual.float(),
        scores.float(),
        target_frr,
        threshold,
        aligned_spread=spread_model,
        bank=None if len(chosen) == count * patches and len(voters) == count else bank,
    )


def voter_indices(count: int) -> torch.Tensor:
    """At most MAX_VOTERS of `count` parts, evenly spread (parts taught in lots stay mixed)."""
    if count <= MAX_VOTERS:
        return torch.arange(count)
    return torch.linspace(0, count - 1, MAX_VOTERS).round().long()


Spread = tuple[list[torch.Tensor], list[torch.Tensor]]  # centre and spread, (L,) per set


def aligned_spread_of(held_out: list[torch.Tensor]) -> Spread:
    """Mean and spread, per position, of the good parts' held-out distances, per set."""
    centre = [d.mean(dim=0) for d in held_out]
    spread = [d.std(dim=0).clamp_min(SPREAD_FLOOR) for d in held_out]
    return centre, spread


def held_out_deviations(held_out: list[torch.Tensor]) -> torch.Tensor:
    """(R,) each good part's largest positional deviation, measured against the centre and
    spread of the other parts only, so a part's own oddity does not widen its yardstick."""
    count = held_out[0].shape[0]
    scores = []
    for index in range(count):
        others = [i for i in range(count) if i != index]
        yardstick = AlignedSpread(*aligned_spread_of([d[others] for d in held_out]), 1.0, 1.0)
        maps = [yardstick.standardise(d[index : index + 1], s) for s, d in enumerate(held_out)]
        scores.append((sum(maps) / len(maps)).amax())
    return torch.stack(scores)


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write the calibration as one safetensors file, atomically."""
    tensors = {f"set_{i}": z.contiguous() for i, z in enumerate(calibration.sets)}
    tensors |= {
        "embeddings": calibration.embeddings.contiguous(),
        "mutual_scores": calibration.mutual_scores.contiguous(),
        "scores": calibration.scores.contiguous(),
    }
    for i, patches in enumerate(calibration.bank or []):
        tensors[f"bank_{i}"] = patches.contiguous()
    if calibration.aligned_spread is not None:
        for i, (centre, spread) in enumerate(
            zip(calibration.aligned_spread.centre, calibration.aligned_spread.spread, strict=True)
        ):
            tensors |= {f"centre_{i}": centre.contiguous(), f"spread_{i}": spread.contiguous()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{
            key: value
            for key, value in asdict(calibration).items()
            if not isinstance(value, torch.Tensor) and key not in ("sets", "aligned_spread", "bank")
        },
    }
    if calibration.aligned_spread is not None:
        header["positional_thresholds"] = [
            calibration.aligned_spread.distance_threshold,
            calibration.aligned_spread.deviation_threshold,
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors, metadata={"musc_edge": json.dumps(header)}))


def stored_aligned_spread(
    tensors: dict[str, torch.Tensor], header: dict, count: int
) -> AlignedSpread | None:
    """The per-position spread of an aligned calibration, None for one that is not aligned."""
    if "centre_0" not in tensors:
        return None
    return AlignedSpread(
        [tensors[f"centre_{i}"] for i in range(count)],
        [tensors[f"spread_{i}"] for i in range(count)],
        *header["positional_thresholds"],
    )


def load_calibration(path: Path, package: ModelPackage | None = None) -> Calibration:
    """Read a calibration; with a package, refuse one made for another package."""
    if not path.is_file():
        raise CalibrationError(f"calibration {path} not found; make one with `musc-edge calibrate`")
    try:
        with safe_open(str(path), "pt") as handle:
            header = json.loads((handle.metadata() or {}).get("musc_edge", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as error:
        raise CalibrationError(f"{path} is not a readable calibration file: {error}") from None
    if header.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a musc-edge calibration")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise CalibrationError(
            f"{path} has calibration format {header.get('format_version')}; this musc-edge "
            f"reads {', '.join(map(str, READABLE_VERSIONS))}. Run `musc-edge calibrate` again"
        )
    count = sum(1 for name in tensors if name.startswith("set_"))
    try:
        calibration = Calibration(
            header["binding"],
            header["files"],
            [tensors[f"set_{i}"] for i in range(count)],
            tensors["embeddings"],
            tensors["mutual_scores"],
            tensors["scores"],
            header["target_frr"],
            header["threshold"],
            header.get("info", {}),
            stored_aligned_spread(tensors, header, count),
            [tensors[f"bank_{i}"] for i in range(count)] if "bank_0" in tensors else None,
        )
    except KeyError as missing:
        raise CalibrationError(
            f"{path} lacks {missing}; it was damaged or not written by musc-edge calibrate"
        ) from None
    if package is not None:
        calibration.check_binding(package, path)
    return calibration
