"""The server's layering holds: the protocol side imports no torch, the server never the client."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server" / "camserve" / "server"
TORCH_FREE = (
    "camserve.server.servicer",
    "camserve.server.validation",
    "camserve.server.messages",
    "camserve.server.streams",
    "camserve.server.records",
    "camserve.server.errors",
    "camserve.v1.render",
)

SCRIPT = textwrap.dedent(
    """
    import importlib
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"No module named {name!r} (hidden for this test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    for name in sys.argv[1:]:
        importlib.import_module(name)
    assert "torch" not in sys.modules
    print("ok")
    """
)


def test_protocol_side_imports_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *TORCH_FREE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_server_module_imports_the_client() -> None:
    offenders = {
        str(path.relative_to(SERVER)): sorted(n for n in _imports(path) if "camserve.client" in n)
        for path in SERVER.rglob("*.py")
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_no_function_of_the_server_or_the_client_is_over_50_lines() -> None:
    roots = (SERVER, SERVER.parents[1] / "client" / "camserve" / "client")
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 50
    ]
    assert not long
    assert len((SERVER / "engine" / "core.py").read_text().splitlines()) <= 350
