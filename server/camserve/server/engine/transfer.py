"""The engine's copies between the host and its device, each a single copy of packed bytes.

Why: a device-to-host copy waits for every kernel queued before it, so each one is a host
synchronisation that leaves the GPU idle until the host queues more work. The engine therefore
keeps a batch's results on the device and moves them all with one `to_host` call at the end; it
is the only place where the explain path waits for the device, and tests count its calls.
Small host-to-device uploads (class indices, row selections) go the other way through
`to_device`, as one non-blocking copy from pinned memory, which does not wait for the device.

Packing: each tensor is flattened and viewed as bytes, padded to `ALIGN` bytes so that every
piece can be viewed back as its own dtype, and the pieces are concatenated into one buffer;
after the copy each piece is a view of that buffer with the tensor's dtype and shape. On the
CPU both functions return the tensors as they are: nothing to copy, nothing to wait for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

ALIGN = 16  # bytes; a multiple of every dtype's size, so each piece can be viewed back


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 1-D uint8 tensor holding every tensor's elements, each piece padded to ALIGN."""
    pieces: list[torch.Tensor] = []
    for tensor in tensors:
        raw = tensor.detach().reshape(-1).view(torch.uint8)
        pieces.append(raw)
        pad = -raw.numel() % ALIGN
        if pad:
            pieces.append(raw.new_zeros(pad))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)


def _unpack(buffer: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `buffer` with the dtypes and shapes of `like`, in `_pack`'s order."""
    out: list[torch.Tensor] = []
    offset = 0
    for tensor in like:
        size = tensor.numel() * tensor.element_size()
        out.append(buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape))
        offset += size + (-size % ALIGN)
    return out


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors are on several devices {sorted(map(str, devices))}; pass one")
    return devices.pop() if devices else None


@contextlib.contextmanager
def _sync_allowed(device: torch.device) -> Iterator[None]:
    """The transfer is the sanctioned synchronisation: CUDA's sync debug mode (which tests set
    to "error" around a whole batch) is switched off for its duration only."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU, in order, moved with one copy and so one synchronisation.

    All tensors must be on one device. Results are contiguous and share one buffer; on the
    CPU the tensors themselves are returned.
    """
    device = _device_of(tensors)
    if device is None or device.type == "cpu":
        return list(tensors)
    with _sync_allowed(device):
        host = _pack(tensors).to("cpu")
    return _unpack(host, tensors)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors on `device`, in order, uploaded with one non-blocking copy.

    On CUDA the packed bytes are pinned first: a non-blocking copy from pageable memory may wait
    for the stream. The caching host allocator keeps the pinned buffer until the copy is done.
    """
    if device.type == "cpu" or not tensors:
        return list(tensors)
    packed = _pack(tensors)
    if device.type == "cuda":
        packed = packed.pin_memory()
    return _unpack(packed.to(device, non_blocking=True), tensors)
