"""Every test that needs CUDA carries the `gpu` marker, which alone decides its skipping.

The root conftest skips `gpu` tests without a CUDA device; this checks, from the test sources,
that no CUDA test was left unmarked (it would fail on a CPU machine) and that none skips itself
another way (so `-m gpu` selects every one of them on a GPU machine).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# How a test puts work on the device, as `ast.unparse` spells it.
CUDA_SIGNS = (".cuda(", "device='cuda", "torch.device('cuda", "torch.cuda.")


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(TESTS.rglob("test_*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _marks_gpu(decorators: list[ast.expr]) -> bool:
    return any("mark.gpu" in ast.unparse(decorator) for decorator in decorators)


def _module_marks_gpu(module: ast.Module) -> bool:
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets
        ):
            return "mark.gpu" in ast.unparse(node.value)
    return False


def _uses_cuda(function: ast.AST) -> bool:
    """Whether the function puts work on a CUDA device (not merely asks whether one exists)."""
    text = ast.unparse(function)
    if "cuda.is_available" in text:  # it checks for itself and runs either way
        return False
    return any(sign in text for sign in CUDA_SIGNS)


def _test_functions(module: ast.Module) -> Iterator[tuple[ast.FunctionDef, list[ast.expr]]]:
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test_"
        ):
            yield node, node.decorator_list  # type: ignore[misc]
        elif isinstance(node, ast.ClassDef):
            for inner in node.body:
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield inner, [*node.decorator_list, *inner.decorator_list]  # type: ignore[misc]


def test_every_cuda_test_is_marked_gpu() -> None:
    unmarked = [
        f"{path.relative_to(TESTS)}::{function.name}"
        for path, module in _sources()
        if not _module_marks_gpu(module)
        for function, decorators in _test_functions(module)
        if _uses_cuda(function) and not _marks_gpu(decorators)
    ]
    assert not unmarked, f"CUDA tests without @pytest.mark.gpu: {unmarked}"
    marked = [path for path, module in _sources() if "mark.gpu" in ast.unparse(module)]
    assert len(marked) >= 4  # the engine, scores, staging and device-JPEG suites at least


def test_no_test_skips_itself_for_cuda_but_through_the_marker() -> None:
    own = [
        str(path.relative_to(TESTS))
        for path, module in _sources()
        for node in ast.walk(module)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func).endswith("skipif")
        and "cuda" in ast.unparse(node)
    ]
    assert not own, f"use @pytest.mark.gpu instead of skipif on CUDA: {own}"


@pytest.mark.gpu
def test_the_gpu_marker_skips_without_cuda() -> None:
    import torch

    assert torch.cuda.is_available()  # reached only where CUDA is present
