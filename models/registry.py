"""The backbone zoo: what each supported ViT is and where its weights can come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from musc_edge.models.backbone import Backbone, BuildRequest

from musc_edge.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one image tower; `arch` is the open_clip or timm model name."""

    name: str
    family: str  # "clip" (open_clip) or "dinov2" (timm)
    arch: str
    patch_size: int
    native_size: int
    depth: int
    pretrained_tag: str | None  # the hub tag tried when no other weights are given
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fetchable: bool = False  # `musc-edge weights fetch NAME` can supply the weights
    resize: str = "pil-bilinear"  # as the original feeds it: torchvision Resize on PIL images

    @property
    def default_layers(self) -> tuple[int, ...]:
        """Four evenly spaced blocks, 1-based: 3/6/9/12 for 12 blocks, 6/12/18/24 for 24."""
        step = self.depth // 4
        return tuple(step * i for i in range(1, 5))


def _clip(name: str, patch: int, native: int, depth: int) -> BackboneSpec:
    # open_clip's own image transform resizes bicubically
    return BackboneSpec(
        name,
        "clip",
        name,
        patch,
        native,
        depth,
        "openai",
        CLIP_MEAN,
        CLIP_STD,
        resize="pil-bicubic",
    )


def _dinov2(size: str, timm_size: str, depth: int, fetchable: bool = False) -> BackboneSpec:
    return BackboneSpec(
        f"dinov2-vit{size}14",
        "dinov2",
        f"vit_{timm_size}_patch14_dinov2",
        14,
        518,
        depth,
        "lvd142m",
        IMAGENET_MEAN,
        IMAGENET_STD,
        fetchable,
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _clip("ViT-B-32", 32, 224, 12),
        _clip("ViT-B-16", 16, 224, 12),
        _clip("ViT-L-14", 14, 224, 24),
        _clip("ViT-L-14-336", 14, 336, 24),
        _dinov2("s", "small", 12, fetchable=True),
        _dinov2("b", "base", 12),
        _dinov2("l", "large", 24),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The spec of a backbone by name, with the known names in the error."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}"
        ) from None


# family name -> builder(request) -> tower
FamilyBuilder = Callable[["BuildRequest"], "Backbone"]
FAMILIES: dict[str, FamilyBuilder] = {}


def register_family(name: str) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator: the builder of every backbone whose spec names this family."""

    def add(builder: FamilyBuilder) -> FamilyBuilder:
        FAMILIES[name] = builder
        return builder

    return add
