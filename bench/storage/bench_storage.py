"""Storage: checkpoint save/load and KV-block put/get against raw sequential I/O and torch.save/load
of the same bytes, in the same run, on the disk that holds --dir.

Usage: python bench/storage/bench_storage.py [--dir DIR] [--gib 1.0] [--kv-blocks 96] [--repeats 2]

Every write ends with fsync (a checkpoint is not saved until it is on disk), and every read starts
after the file's pages are dropped from the page cache (posix_fadvise DONTNEED), so reads come
from the device. Figures are the best of --repeats runs, in GB/s (10^9 bytes per second).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fireflyer.storage import checkpoint
from fireflyer.storage.fs import aligned_buffer
from fireflyer.storage.kvcache import KVBlockStore

RAW_CHUNK = 64 << 20
KV_SHAPE = (64, 61, 576)  # DeepSeek-V3: 64-token blocks, 61 layers, 512 latent + 64 rope


def drop_cache(path: Path) -> None:
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, data.nbytes, RAW_CHUNK):
            os.write(fd, data[start : start + RAW_CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, out: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in range(0, out.nbytes, RAW_CHUNK):
            os.readv(fd, [out[start : start + RAW_CHUNK]])
    finally:
        os.close(fd)


def torch_save(path: Path, state: dict[str, torch.Tensor]) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def best(repeats: int, run: Callable[[], None], before: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def make_state(total_bytes: int) -> dict[str, torch.Tensor]:
    tensor_bytes = 32 << 20
    count = max(1, total_bytes // tensor_bytes)
    generator = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.weight": torch.randn(tensor_bytes // 2, generator=generator).to(torch.bfloat16)
        for i in range(count)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    parser.add_argument("--kv-blocks", type=int, default=96, help="KV blocks per batch (4.5 MB each)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fireflyer-bench-", dir=args.dir))
    try:
        results = run(root, int(args.gib * (1 << 30)), args.kv_blocks, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))


def run(root: Path, total: int, kv_blocks: int, repeats: int) -> dict[str, object]:
    state = make_state(total)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    payload = aligned_buffer(nbytes)
    position = 0
    for tensor in state.values():
        size = tensor.numel() * tensor.element_size()
        payload[position : position + size] = tensor.reshape(-1).view(torch.uint8).numpy()
        position += size

    raw_path = root / "raw.bin"
    raw_w = best(repeats, lambda: raw_write(raw_path, payload))
    raw_r = best(repeats, lambda: raw_read(raw_path, aligned_buffer(nbytes)), lambda: drop_cache(raw_path))
    raw_path.unlink()

    torch_path = root / "torch.pt"
    torch_w = best(repeats, lambda: torch_save(torch_path, state))
    torch_r = best(repeats, lambda: torch.load(torch_path), lambda: drop_cache(torch_path))
    torch_path.unlink()

    ckpt_dir = root / "ckpt"
    steps = iter(range(1, 1000))
    save_w = best(repeats, lambda: checkpoint.save(ckpt_dir, state, next(steps), keep_last=1))
    load_r = best(repeats, lambda: checkpoint.load_latest(ckpt_dir), lambda: drop_cache(ckpt_dir))

    caller, total_async = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pending = checkpoint.save_async(ckpt_dir, state, next(steps), keep_last=1)
        caller.append(time.perf_counter() - start)
        pending.wait()
        total_async.append(time.perf_counter() - start)
    hidden = 1 - min(caller) / min(total_async)

    kv_bytes = kv_blocks * KV_SHAPE[0] * KV_SHAPE[1] * KV_SHAPE[2] * 2
    generator = torch.Generator().manual_seed(1)
    blocks = [torch.randn(KV_SHAPE, generator=generator).to(torch.bfloat16) for _ in range(kv_blocks)]
    kv_root = root / "kv"
    rounds = iter(range(1000))

    def put() -> None:
        with KVBlockStore(kv_root, layers=KV_SHAPE[1], capacity_bytes=4 * kv_bytes + (1 << 30)) as store:
            base = next(rounds)
            store.put(store.keys_for(list(range(base, base + kv_blocks * 64))), blocks)
            os.sync()  # the same durability the raw and checkpoint writes pay

    put_w = best(repeats, put)
    with KVBlockStore(kv_root, layers=KV_SHAPE[1], capacity_bytes=4 * kv_bytes + (1 << 30)) as store:
        keys = store.keys_for(list(range(0, kv_blocks * 64)))

        def get() -> None:
            assert all(b is not None for b in store.get(keys))

        get_r = best(repeats, get, lambda: drop_cache(kv_root / "blocks"))

    def gbps(size: int, seconds: float) -> float:
        return round(size / seconds / 1e9, 3)

    rows = {
        "bytes": nbytes,
        "raw_write_GBps": gbps(nbytes, raw_w),
        "raw_read_GBps": gbps(nbytes, raw_r),
        "checkpoint_save_GBps": gbps(nbytes, save_w),
        "checkpoint_load_GBps": gbps(nbytes, load_r),
        "torch_save_GBps": gbps(nbytes, torch_w),
        "torch_load_GBps": gbps(nbytes, torch_r),
        "save_vs_raw": round(raw_w / save_w, 3),
        "load_vs_raw": round(raw_r / load_r, 3),
        "save_vs_torch": round(torch_w / save_w, 3),
        "load_vs_torch": round(torch_r / load_r, 3),
        "async_caller_s": round(min(caller), 3),
        "async_total_s": round(min(total_async), 3),
        "async_hidden_fraction": round(hidden, 3),
        "kv_blocks": kv_blocks,
        "kv_put_GBps": gbps(kv_bytes, put_w),
        "kv_get_GBps": gbps(kv_bytes, get_r),
        "kv_put_vs_raw_write": round(raw_w / nbytes * kv_bytes / put_w, 3),
        "kv_get_vs_raw_read": round(raw_r / nbytes * kv_bytes / get_r, 3),
    }
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value}")
    return rows


if __name__ == "__main__":
    main()
