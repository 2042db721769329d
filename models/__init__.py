"""Backbone zoo: CLIP image towers (open_clip) and DINOv2 (timm) behind one interface."""

from musc_edge.models.backbone import Backbone, WeightsInfo
from musc_edge.models.factory import create_backbone
from musc_edge.models.registry import BACKBONES, BackboneSpec, get_spec
from musc_edge.models.weights import MissingWeightsError

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "MissingWeightsError",
    "WeightsInfo",
    "create_backbone",
    "get_spec",
]
