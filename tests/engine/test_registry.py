"""The method registry is the one place a method is defined: its entries' facts, and no other
server module naming a method in a string."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from camserve.server.engine import BY_NAME, NAMES, PASS_METHODS, REGISTRY, ROW_METHODS, Produces
from camserve.server.engine.layouts import LAYOUTS, NCHW
from camserve.server.engine.methods import GRADCAM
from camserve.server.engine.registry import (
    PIXEL_PASS_METHODS,
    ChannelRows,
    Method,
    needing_rows,
    pass_methods,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import DEFAULT_METHOD

SERVER = Path(__file__).resolve().parents[2] / "server" / "camserve" / "server"
REGISTRY_FILE = SERVER / "engine" / "registry.py"


def _docstrings(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def test_no_server_module_but_the_registry_spells_a_method_name() -> None:
    word = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b")
    offenders: list[str] = []
    for path in sorted(SERVER.rglob("*.py")):
        if path == REGISTRY_FILE:
            continue
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and word.search(node.value)
            ):
                offenders.append(f"{path.relative_to(SERVER)}:{node.lineno}: {node.value!r}")
    assert not offenders


def test_every_method_states_what_its_pass_produces_and_accepts() -> None:
    assert len(NAMES) == len(REGISTRY) == len({m.wire for m in REGISTRY})
    assert BY_NAME[DEFAULT_METHOD].wire == pb.METHOD_GRADCAM
    # The CAMs and pixel attributions of the pass, and the methods made by rows after it,
    # split the registry, each in wire order.
    made = PASS_METHODS + PIXEL_PASS_METHODS + ROW_METHODS
    assert sorted(made, key=NAMES.index) == list(NAMES)
    assert len(set(made)) == len(NAMES)
    for entry in REGISTRY:
        assert entry.layouts <= frozenset(LAYOUTS)
        made_by_pass = entry.kernel is not None or (
            entry.pixel is not None and not entry.pixel.path
        )
        assert made_by_pass == entry.produces.from_pass
    assert [m.name for m in REGISTRY if not m.needs_gradients and m.kernel is not None] == [
        "eigencam"
    ]
    # Pixel attributions differentiate the input; only guided_gradcam needs the layer too.
    assert [m.name for m in REGISTRY if m.pixel is not None and m.needs_gradients] == [
        "guided_gradcam"
    ]
    ablation, score = BY_NAME["ablationcam"], BY_NAME["scorecam"]
    assert (ablation.produces, ablation.layouts) == (Produces.ROWS_AFTER_LAYER, {NCHW})
    assert (score.produces, score.layouts) == (Produces.ROWS_OF_MODEL, frozenset(LAYOUTS))
    assert ablation.runs_tail
    assert not score.runs_tail


def test_rows_and_cost_per_copy_follow_what_the_pass_produces() -> None:
    assert (BY_NAME["gradcam"].rows_per_copy(512), BY_NAME["gradcam"].cost_per_copy(512, 0.1)) == (
        1,
        1.0,
    )
    assert BY_NAME["ablationcam"].rows_per_copy(512) == 513
    assert BY_NAME["ablationcam"].cost_per_copy(512, 0.25) == 1 + 128
    assert BY_NAME["scorecam"].cost_per_copy(512, 0.25) == 513
    # A row with its gradient at the input weighs two forward passes; SmoothGrad and IG add
    # such rows after their explain row.
    assert BY_NAME["saliency"].cost_per_copy(512, 0.25) == 2.0
    assert BY_NAME["smoothgrad"].rows_per_copy(512, gradient_rows=25) == 26
    assert BY_NAME["smoothgrad"].cost_per_copy(512, 0.25, gradient_rows=25) == 51.0
    assert BY_NAME["guided_gradcam"].needs_gradients  # its Grad-CAM: the layer's gradients
    assert BY_NAME["guided_gradcam"].input_gradient == "guided"
    assert BY_NAME["input_x_gradient"].input_gradient == "plain"


def test_name_lists_split_a_request_by_what_it_needs() -> None:
    asked = ("scorecam", "gradcam", "ablationcam", "eigencam")
    assert pass_methods(asked) == ("gradcam", "eigencam")
    assert [m.name for m in needing_rows(asked)] == ["scorecam", "ablationcam"]


def test_an_entry_must_be_made_by_the_pass_or_by_rows_not_both() -> None:
    rows = BY_NAME["scorecam"].rows
    assert isinstance(rows, ChannelRows)
    with pytest.raises(ValueError, match="never two"):
        Method("broken", 99, Produces.LAYER_GRADIENTS, frozenset(LAYOUTS), GRADCAM, rows)
    with pytest.raises(ValueError, match="never two"):
        Method("broken", 99, Produces.ROWS_OF_MODEL, frozenset(LAYOUTS))
