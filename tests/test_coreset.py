"""Teach-in at scale: the k-centre coreset bank and the capped voters, on real bottle features."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from musc_edge import calibration as calibration_module
from musc_edge.calibration import calibrate, load_calibration, save_calibration
from musc_edge.coreset import k_centre
from musc_edge.musc import MuSc, References
from musc_edge.runtime.known_good import Joined, KnownGood
from tests.helpers import write_package


def test_k_centre_takes_one_patch_of_each_far_cluster_first() -> None:
    centres = F.normalize(torch.randn(3, 16), dim=-1) * 10
    points = torch.cat([centre + 0.01 * torch.randn(50, 16) for centre in centres])
    chosen = k_centre([points[None]], 3)
    assert sorted((chosen // 50).tolist()) == [0, 1, 2]
    assert len(set(k_centre([points[None]], 150).tolist())) == 150  # all, none twice


def bottle_calibration(tmp_path: Path, features, **options):
    package = write_package(tmp_path / "pkg", image_size=224)
    good = [t[:6] for t in features.tokens]  # the six good bottles
    names = [f"good_{index}.png" for index in range(6)]
    return package, calibrate(package, MuSc(), good, features.embeddings[:6], names, **options)


def test_a_coreset_bank_is_bounded_and_its_scores_stay_on_the_safe_side(
    tmp_path: Path, bottle_features
) -> None:
    package, full = bottle_calibration(tmp_path, bottle_features, coreset=1.0)
    patches = 6 * bottle_features.tokens[0].shape[1]
    _, small = bottle_calibration(tmp_path, bottle_features, bank_patches=patches // 4)
    assert full.bank is None and all(b.shape[0] == patches // 4 for b in small.bank)
    # a part held out against a quarter of the others' patches is never closer than against
    # all of them: the threshold can only rise, the false rejects only fall
    assert (small.scores >= full.scores - 1e-3).all()
    assert small.threshold >= full.threshold
    save_calibration(small, tmp_path / "small.safetensors")
    loaded = load_calibration(tmp_path / "small.safetensors", package)
    for a, b in zip(loaded.bank, small.bank, strict=True):
        assert torch.equal(a, b)
    queries = MuSc().pool([t[6:] for t in bottle_features.tokens])  # the six broken bottles
    near = MuSc().bank_maps(queries, full.references()).flatten(1).amax(dim=1)
    far = MuSc().bank_maps(queries, loaded.references()).flatten(1).amax(dim=1)
    assert (far >= near - 1e-3).all() and (far > loaded.threshold).all()


def test_at_most_max_voters_join_msm(tmp_path: Path, bottle_features, monkeypatch) -> None:
    monkeypatch.setattr(calibration_module, "MAX_VOTERS", 4)
    _, made = bottle_calibration(tmp_path, bottle_features, coreset=1.0)
    assert made.sets[0].shape[0] == 4 and made.embeddings.shape[0] == 4
    assert len(made.scores) == 6 and len(made) == 6
    assert made.summary()["voters"] == 4 and made.summary()["bank_patches"] == 6 * 256


def test_a_joining_part_grows_the_bank_but_scoring_does_not_copy_it(
    tmp_path: Path, bottle_features
) -> None:
    patches = 6 * bottle_features.tokens[0].shape[1]
    _, small = bottle_calibration(tmp_path, bottle_features, bank_patches=patches // 4)
    known_good = KnownGood(small, refresh=2)
    base = known_good.references()
    sets = [z[0] for z in MuSc().pool([t[:1] for t in bottle_features.tokens])]
    joined = Joined("good_0.png", sets, bottle_features.embeddings[0], 0.0)
    assert known_good.offer(joined, score=0.0)
    grown = known_good.references()
    assert len(grown) == len(base) + 1
    assert grown.bank[0].shape[0] == patches // 4 + sets[0].shape[0]
    # the voters MSM sees for a batch: the window's and the known-good parts', no bank copy
    window = References([z[:1] for z in base.sets], base.embeddings[:1], base.raw_scores[:1])
    voters = window.join(grown)
    assert voters.bank is None and len(voters) == 1 + len(grown)
