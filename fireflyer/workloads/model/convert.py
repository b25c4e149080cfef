"""DeepSeek FP8 checkpoint → plain checkpoint (the job of DeepSeek's fp8_cast_bf16.py).

Each e4m3 weight becomes q · scale_inv per block (the block from quantization_config), the
`_scale_inv` tensors are dropped, and config.json loses its quantization_config. Other floating
tensors are cast to the same dtype, except the router's correction bias, which stays float32 as in
DeepSeek's checkpoints. Shard files keep their names; one tensor is in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fireflyer.kernels.fp8 import dequantize_per_block
from fireflyer.storage.safetensors_format import DTYPES_BY_NAME
from fireflyer.workloads.model.checkpoint_writer import (
    INDEX_FILE,
    SINGLE_FILE,
    StoredTensor,
    staged_directory,
    write_index,
    write_json,
    write_safetensors,
)
from fireflyer.workloads.model.init import FP8_DTYPE
from fireflyer.workloads.model.model import TORCH_DTYPES

SCALE_SUFFIX = "_scale_inv"
_KEEP_FLOAT32 = ("e_score_correction_bias",)


def _weight_map(src: Path) -> dict[str, str]:
    index = src / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return weight_map
    if not (src / SINGLE_FILE).exists():
        raise FileNotFoundError(f"{src} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(str(src / SINGLE_FILE), framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def _block_size(config: dict[str, Any]) -> tuple[int, int]:
    quant = config.get("quantization_config")
    if not quant or quant.get("quant_method") != "fp8":
        raise ValueError("config.json has no fp8 quantization_config: not an FP8 checkpoint")
    rows, cols = quant.get("weight_block_size", [128, 128])
    return int(rows), int(cols)


def dequantize_block(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 q · scale_inv, one scale per block (the last row and column blocks may be partial)."""
    if q.dim() != 2:
        raise ValueError(f"expected a 2-D FP8 weight, got shape {tuple(q.shape)}")
    n, k = q.shape
    rows, cols = block
    expected = (-(-n // rows), -(-k // cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match {expected} for a {n}×{k} weight"
        )
    return dequantize_per_block(q, scale_inv, block)


class _Checkpoint:
    """Reads tensors of a checkpoint by name, opening each shard once."""

    def __init__(self, src: Path, weight_map: dict[str, str], stack: ExitStack) -> None:
        self._src, self._weight_map, self._stack = src, weight_map, stack
        self._open: dict[str, Any] = {}

    def _file(self, name: str) -> Any:
        file = self._weight_map[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(str(self._src / file), framework="pt"))
        return self._open[file]

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def dtype_and_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        view = self._file(name).get_slice(name)
        return DTYPES_BY_NAME[view.get_dtype()], tuple(view.get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self._file(name).get_tensor(name)
        return tensor


def _out_dtype(name: str, source: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if not source.is_floating_point:
        return source
    if name.endswith(_KEEP_FLOAT32) and source == torch.float32:
        return torch.float32
    return dtype


def _plain(checkpoint: _Checkpoint, name: str, block: tuple[int, int]) -> torch.Tensor:
    tensor = checkpoint.tensor(name)
    if tensor.dtype != FP8_DTYPE:
        return tensor
    scale_name = name + SCALE_SUFFIX
    if scale_name not in checkpoint:
        raise ValueError(f"{name} is FP8 but the checkpoint has no {scale_name}")
    return dequantize_block(tensor, checkpoint.tensor(scale_name), block)


def _convert_shard(
    checkpoint: _Checkpoint, names: list[str], path: Path, block: tuple[int, int], dtype: torch.dtype
) -> list[StoredTensor]:
    entries = []
    for name in names:
        source, shape = checkpoint.dtype_and_shape(name)
        entries.append(StoredTensor(name, _out_dtype(name, source, dtype), shape))
    tensors = ((e.name, _plain(checkpoint, e.name, block).to(e.dtype)) for e in entries)
    write_safetensors(path, entries, tensors)
    return entries


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, not {dtype}")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and anything else that is not weights or config.json."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(path, dst / path.name)


def dequantize_checkpoint(
    src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16, *, overwrite: bool = False
) -> Path:
    """Writes the plain (unquantised) form of the FP8 checkpoint `src` into `dst`; returns `dst`."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    block = _block_size(config)
    dtype_name = _dtype_name(dtype)
    weight_map = _weight_map(src)
    files = sorted(set(weight_map.values()))
    with torch.no_grad(), staged_directory(Path(dst), overwrite=overwrite) as staging:
        _copy_side_files(src, staging)
        out_map: dict[str, str] = {}
        total = 0
        with ExitStack() as stack:
            checkpoint = _Checkpoint(src, weight_map, stack)
            for file_name in files:
                names = [n for n, f in weight_map.items() if f == file_name and not n.endswith(SCALE_SUFFIX)]
                entries = _convert_shard(checkpoint, sorted(names), staging / file_name, block, dtype)
                out_map |= {e.name: file_name for e in entries}
                total += sum(e.nbytes for e in entries)
        if (src / INDEX_FILE).exists():
            write_index(staging, out_map, total)
        config.pop("quantization_config")
        config["torch_dtype"] = dtype_name
        write_json(staging / "config.json", config)
    return Path(dst)
