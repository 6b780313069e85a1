"""Where the command line writes its pictures: what `--out` may name, checked before any call.

`explain --out` is a folder (made when missing). `compare --out` is the panel: a .png, .jpg or
.webp file, or a folder, which gets `compare.png`. `kernels --out` is a .png file or a folder.
A path that cannot work is refused up front with a message saying what `--out` takes, so no
request is sent for an answer that could not be saved.
"""

from __future__ import annotations

from pathlib import Path

PANEL_NAME = "compare.png"
PANEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class OutputPathError(ValueError):
    """An `--out` path the command cannot write to; the message says what it takes."""


def check_folder(out: Path, writes: str = "explain writes one PNG per heatmap") -> None:
    """Refuses an `--out` folder (explain, features, attention) that is not a folder nor could
    become one; `writes` says what the command puts there."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(
            f"--out {out}: is a file; {writes} into a folder, so "
            "give a folder's path (it is made when missing)"
        )
    _check_parents(out)


def panel_file(out: Path) -> Path:
    """The file a `compare --out` names: the path itself when it is an image file, else
    `compare.png` inside it when it is (or looks like) a folder."""
    if out.is_dir() or str(out).endswith(("/", "\\")) or not out.suffix:
        _check_parents(out / PANEL_NAME)
        return out / PANEL_NAME
    if out.suffix.lower() not in PANEL_SUFFIXES:
        raise OutputPathError(
            f"--out {out}: the panel is an image; give a file ending in "
            f"{', '.join(PANEL_SUFFIXES)}, or a folder, which gets {PANEL_NAME}"
        )
    _check_parents(out)
    return out


def check_kernels_target(out: Path) -> None:
    """Refuses a `kernels --out` that is neither a folder nor a .png file."""
    if not out.is_dir() and out.suffix.lower() != ".png":
        raise OutputPathError(
            f"--out {out}: give a .png file, or a folder, which gets kernels_MODEL_LAYER_pPAGE.png"
        )
    _check_parents(out)


def _check_parents(path: Path) -> None:
    """Refuses a path under an existing file (no folder can be made there)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(
                    f"--out {path}: {parent} is a file, so nothing can be written under it"
                )
            return
