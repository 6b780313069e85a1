"""Class labels: ImageNet's built in (from torchvision's metadata), or a file of one per line."""

from __future__ import annotations

from pathlib import Path


def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order, as torchvision ships them."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def load_labels(spec: str, num_classes: int) -> tuple[str, ...]:
    """Labels for a model with `num_classes` outputs; `spec` is "imagenet", a file, or empty."""
    if not spec:
        return tuple(f"class_{i}" for i in range(num_classes))
    if spec == "imagenet":
        labels = imagenet_labels()
    else:
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read labels file {spec}: {exc.strerror}") from None
        labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != num_classes:
        raise ValueError(
            f"labels {spec!r} has {len(labels)} entries but the model has {num_classes} classes; "
            'give one label per class, or labels = "" for class_N names'
        )
    return labels
