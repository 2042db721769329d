"""Engine portability: a TensorRT engine runs only where it was built."""

from __future__ import annotations

from musc_edge.package import ENGINE_FILE, ModelPackage
from musc_edge.runtime.runners import RunnerError

ENGINE_FIELDS = ("gpu", "compute_capability", "tensorrt")


def check_engine(package: ModelPackage, here: dict[str, str]) -> None:
    """Refuse an engine built for another GPU, compute capability or TensorRT version.

    TensorRT engines are not portable; loading a foreign one fails deep inside TensorRT or,
    worse, runs with untuned kernels. One line says what differs and how to fix it.
    """
    built = package.engine or {}
    differences = [
        f"{field} {built.get(field)!r} (here {here[field]!r})"
        for field in ENGINE_FIELDS
        if str(built.get(field)) != here[field]
    ]
    if differences:
        raise RunnerError(
            f"{package.path(ENGINE_FILE)} was built for another platform: "
            + ", ".join(differences)
            + f"; rebuild it on this device (musc-edge engine build --model {package.folder} "
            "--force) or use --engine onnxruntime"
        )
