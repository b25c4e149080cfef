"""The safetensors file layout, written and read by us so that I/O stays in our parallel engines.

A file is: 8-byte little-endian header length, a JSON header padded with spaces to a multiple of
8 bytes, then the tensors' bytes back to back. Tensors are laid out by descending element size so
that every tensor starts at an offset aligned to its element size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the start of the data section
    end: int


@dataclass(frozen=True)
class FileLayout:
    header: bytes  # the length prefix and the padded JSON
    entries: tuple[TensorEntry, ...]

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def total_bytes(self) -> int:
        return self.data_start + (self.entries[-1].end if self.entries else 0)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def plan_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> FileLayout:
    """Offsets for `tensors` (sorted by element size, then name) and the encoded header."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries = []
    position = 0
    header_json: dict[str, object] = {}
    if metadata:
        header_json["__metadata__"] = dict(metadata)
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        entry = TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), position, position + nbytes)
        entries.append(entry)
        header_json[name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
        position += nbytes
    encoded = json.dumps(header_json, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return FileLayout(struct.pack("<Q", len(encoded)) + encoded, tuple(entries))


def parse_header(prefix: bytes) -> tuple[int, dict[str, object]]:
    """(data section start, header JSON) from the first bytes of a file; ValueError when malformed."""
    if len(prefix) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if len(prefix) < 8 + length:
        raise ValueError(f"header of {length} bytes extends past the bytes read")
    header = json.loads(prefix[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + length, header


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")
