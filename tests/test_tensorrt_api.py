"""The TensorRT path against TensorRT's published Python API.

TensorRT cannot run on these machines, so a renamed or removed call would only show on a
device. This test reads the type stubs of the whole API (PyPI's `tensorrt-stubs`, fetched as a
wheel with pip and never installed: an installed stub package would make `import tensorrt`
succeed as an empty namespace) and checks every TensorRT class, enum member, function,
method and attribute that `runtime/` uses, following the types the stubs give for return
values (`config.get_timing_cache().serialize()` checks both steps).
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import need

STUBS_VERSION = "10.13.0.35.1"
STUBS_WHEEL = f"tensorrt_stubs-{STUBS_VERSION}-py3-none-any.whl"
RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
USERS = ("engine_builder.py", "tensorrt_runner.py")  # every module that touches `trt`
# What each receiver name in those modules holds; the test fails on a receiver it cannot type.
RECEIVERS = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "config": "IBuilderConfig",
    "profile": "IOptimizationProfile",
    "layer": "ILayer",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
}


@dataclass
class StubClass:
    bases: list[str] = field(default_factory=list)
    members: dict[str, str | None] = field(default_factory=dict)  # name -> annotation


CLASS = re.compile(r"^(\s*)class (\w+)(?:\((.*)\))?:")
MEMBER = re.compile(r"^(\s*)(?:def (\w+)\(.*?\)(?:\s*->\s*(.+?))?:|(\w+)\s*:\s*([^=#]+))")


def parse_stubs(text: str) -> tuple[dict[str, StubClass], dict[str, str | None]]:
    """Classes (nested ones as Outer.Inner) with their members, and module-level names.

    The stubs are not valid Python for `ast` (a default before a non-default argument), so
    they are read line by line with the indentation giving the nesting.
    """
    classes: dict[str, StubClass] = {}
    module: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (indent, qualified name)
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "@", '"', "'")):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and indent <= stack[-1][0]:
            stack.pop()
        if found := CLASS.match(line):
            name = ".".join([*(q for _, q in stack[-1:]), found.group(2)])
            bases = [b.strip().split(".")[-1] for b in (found.group(3) or "").split(",")]
            classes[name] = StubClass([b for b in bases if b])
            (classes[stack[-1][1]].members if stack else module)[found.group(2)] = name
            stack.append((indent, name))
            continue
        if found := MEMBER.match(line):
            name = found.group(2) or found.group(4)
            annotation = (found.group(3) or found.group(5) or "").strip() or None
            target = classes[stack[-1][1]].members if stack else module
            target.setdefault(name, annotation)
    return classes, module


def type_name(annotation: str | None) -> str | None:
    """The class an annotation names ('ITimingCache', 'typing.ClassVar[X]' -> X)."""
    if annotation is None:
        return None
    inner = re.sub(r"^typing\.ClassVar\[(.*)\]$", r"\1", annotation.strip())
    return inner.split(".")[-1].split("[")[0].strip() or None


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> tuple[dict[str, StubClass], dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("stubs")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder)]
    done = subprocess.run([*command, f"tensorrt-stubs=={STUBS_VERSION}"], capture_output=True)
    wheel = folder / STUBS_WHEEL
    need(done.returncode == 0 and wheel.is_file(), "PyPI is not reachable for tensorrt-stubs")
    print(
        f"\ntensorrt-stubs {STUBS_VERSION} sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()}"
    )
    with zipfile.ZipFile(wheel) as archive:
        bindings = archive.read("tensorrt_bindings/tensorrt.pyi").decode()
        package = archive.read("tensorrt/__init__.pyi").decode()
    classes, module = parse_stubs(bindings)
    module.update(parse_stubs(package)[1])
    return classes, module


def has_member(classes: dict[str, StubClass], name: str, member: str) -> str | bool | None:
    """The member's annotation (searching base classes), or False when it does not exist."""
    seen = [name]
    while seen:
        current = classes.get(seen.pop())
        if current is None:
            continue
        if member in current.members:
            return current.members[member]
        seen += current.bases
    return False


class Checker(ast.NodeVisitor):
    """Types the expressions built from `trt` and the known receivers; records every use
    the stubs do not have."""

    def __init__(self, classes, module, source: str) -> None:
        self.classes, self.module, self.source = classes, module, source
        self.missing: list[str] = []
        self.checked: set[str] = set()

    def type_of(self, node: ast.AST) -> str | None:
        """The TensorRT class an expression evaluates to, where the stubs say."""
        if isinstance(node, ast.Name) and node.id in RECEIVERS:
            return RECEIVERS[node.id]
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return RECEIVERS.get(node.attr)
            if isinstance(node.value, ast.Name) and node.value.id == "trt":
                value = self.module.get(node.attr)
                return value if value in self.classes else type_name(value)
            owner = self.type_of(node.value)
            if owner is not None:
                found = has_member(self.classes, owner, node.attr)
                if found and f"{owner}.{node.attr}" in self.classes:
                    return f"{owner}.{node.attr}"
                return type_name(found) if found else None
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "trt"
                and func.attr in self.classes
            ):
                return func.attr  # a constructor
            return self.type_of(func)
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id == "trt":
            self.checked.add(f"trt.{node.attr}")
            if node.attr not in self.module:
                self.missing.append(f"{self.source}:{node.lineno} trt.{node.attr}")
        else:
            owner = self.type_of(node.value)
            if owner in self.classes:  # a TensorRT object, not a str or an int from one
                self.checked.add(f"{owner}.{node.attr}")
                if has_member(self.classes, owner, node.attr) is False:
                    self.missing.append(f"{self.source}:{node.lineno} {owner}.{node.attr}")
        self.generic_visit(node)


def test_every_tensorrt_name_the_runtime_uses_is_in_the_published_api(stubs) -> None:
    classes, module = stubs
    assert {"Builder", "ICudaEngine", "IExecutionContext", "OnnxParser"} <= set(classes)
    missing, checked = [], set()
    for name in USERS:
        checker = Checker(classes, module, name)
        checker.visit(ast.parse((RUNTIME / name).read_text()))
        missing += checker.missing
        checked |= checker.checked
    print(f"checked {len(checked)} TensorRT names: {', '.join(sorted(checked))}")
    assert not missing, f"not in TensorRT {STUBS_VERSION}'s API: {missing}"
    assert len(checked) >= 40  # the walk reached the builder, parser, engine and context


def test_every_receiver_in_the_table_is_used(stubs) -> None:
    """The receiver table stays in step with the code: each name is used, each type exists."""
    classes, _ = stubs
    text = "\n".join((RUNTIME / name).read_text() for name in USERS)
    for receiver, kind in RECEIVERS.items():
        assert re.search(rf"\b{receiver}\.\w", text), f"{receiver} is not used any more"
        assert kind in classes, kind


def test_the_checker_finds_a_removed_call(stubs) -> None:
    classes, module = stubs
    checker = Checker(classes, module, "example")
    code = "engine.execute_v2(1)\nconfig.get_timing_cache().serialise()\ntrt.NoSuchThing"
    checker.visit(ast.parse(code))
    assert checker.missing == [
        "example:1 ICudaEngine.execute_v2",
        "example:2 ITimingCache.serialise",
        "example:3 trt.NoSuchThing",
    ]
