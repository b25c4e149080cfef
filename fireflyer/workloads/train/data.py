"""Tokenized shards and the deterministic batch loader.

On disk (`fireflyer.tokens/v1`)::

    DIR/index.json        {"format": "fireflyer.tokens/v1", "dtype": "uint32",
                           "shards": [{"file": "shard-00000.bin", "tokens": N}, ...],
                           "documents": D}          (documents: optional)
    DIR/shard-00000.bin   N little-endian tokens, read through numpy memmap

The shards form one token stream. Window w is the tokens [w·T, w·T + T + 1) of that stream (inputs
and the next-token targets of a sequence of T). Each epoch visits every window once in an order
given by a keyed permutation of the window indices, so the sample a rank reads at a step is a pure
function of (seed, step, dp rank, dp size): a resumed run reads exactly the batches it would have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fireflyer.errors import FireflyerError

FORMAT = "fireflyer.tokens/v1"
INDEX = "index.json"
DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_SHARD_TOKENS = 1 << 28  # 1 GiB of uint32 per shard
_MASK64 = (1 << 64) - 1


class DataError(FireflyerError):
    """A data directory that cannot be trained on; the message names the file or flag."""


class TokenShards:
    """The token stream of a data directory, memory-mapped shard by shard."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        try:
            meta = json.loads(index.read_text())
        except FileNotFoundError:
            raise DataError(
                f"{index}: not found (write shards with write_shards or `fireflyer prepare`)"
            ) from None
        except ValueError as error:
            raise DataError(f"{index}: not JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{index}: format must be {FORMAT!r}")
        if meta.get("dtype") not in DTYPES:
            raise DataError(f"{index}: dtype must be one of {', '.join(DTYPES)}, not {meta.get('dtype')!r}")
        self.dtype = DTYPES[meta["dtype"]]
        self.documents: int | None = meta.get("documents")
        self._maps: list[np.memmap[Any, np.dtype[Any]]] = []
        sizes: list[int] = []
        for shard in meta.get("shards") or []:
            path = self.directory / str(shard.get("file"))
            tokens = int(shard.get("tokens", -1))
            size = path.stat().st_size if path.is_file() else None
            if size != tokens * self.dtype.itemsize:
                found = "no file" if size is None else f"{size} bytes"
                raise DataError(f"{path}: index.json says {tokens} tokens, found {found}")
            if tokens:  # numpy cannot map an empty file
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
                sizes.append(tokens)
        self._starts = np.cumsum([0, *sizes])
        self.total = int(self._starts[-1])
        if self.total == 0:
            raise DataError(f"{self.directory}: the data holds no tokens")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (a window may span shards)."""
        out = np.empty(length, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while done < length:
            offset = start + done - int(self._starts[shard])
            piece = self._maps[shard][offset : offset + length - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            shard += 1
        return out


@dataclass(frozen=True)
class Loader:
    """Batches of one data-parallel rank: [micro_batches, micro_batch_size, seq_len + 1] tokens.

    Samples are numbered globally: step s covers samples [first_sample(s), first_sample(s) + global
    batch), and rank r's micro-batch j takes the micro_batch_size samples starting at
    (r · micro_batches + j) · micro_batch_size, so one rank with 2M micro-batches reads the same
    samples as two ranks with M each. `sample_offset` lets a resumed run continue from the sample
    count in its checkpoint even when the global batch size changed.
    """

    shards: TokenShards
    seq_len: int
    micro_batch_size: int
    micro_batches: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    sample_offset: int = 0

    def __post_init__(self) -> None:
        if self.windows < 1:
            raise DataError(
                f"{self.shards.directory}: {self.shards.total} tokens are fewer than one sample of"
                f" --seq-len {self.seq_len} + 1"
            )

    @property
    def windows(self) -> int:
        return (self.shards.total - 1) // self.seq_len

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.dp_size

    def first_sample(self, step: int) -> int:
        """Samples consumed before step `step` (0-based) starts."""
        return self.sample_offset + step * self.global_batch

    def sample_ids(self, step: int) -> np.ndarray:
        """Global sample numbers of this rank's batch at `step`, shaped [micro_batches, micro_batch_size]."""
        local = self.micro_batches * self.micro_batch_size
        first = self.first_sample(step) + self.dp_rank * local
        return np.arange(first, first + local, dtype=np.int64).reshape(self.micro_batches, -1)

    def window_of(self, samples: np.ndarray) -> np.ndarray:
        """Window index of each sample: epoch e = sample // windows visits windows in permutation e."""
        epochs, positions = np.divmod(samples, self.windows)
        out = np.empty_like(samples)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = permute(positions[chosen], self.windows, self.seed, int(epoch))
        return out

    def batch(self, step: int) -> np.ndarray:
        windows = self.window_of(self.sample_ids(step)).reshape(-1)
        rows = [self.shards.read(int(w) * self.seq_len, self.seq_len + 1) for w in windows]
        return np.stack(rows).reshape(self.micro_batches, self.micro_batch_size, self.seq_len + 1)


# --- a keyed permutation of [0, n) without materialising it ---------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps, as it should)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int, rounds: int) -> list[np.uint64]:
    keys = []
    for r in range(rounds):
        raw = np.array([(seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + r) & _MASK64], np.uint64)
        keys.append(_mix(raw)[0])
    return keys


def permute(index: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 4) -> np.ndarray:
    """A bijection of [0, n) keyed by (seed, epoch): a balanced Feistel network over the smallest
    even power of two ≥ n, cycle-walked back into range. Memory is O(len(index)), not O(n), so
    corpora of billions of windows shuffle as cheaply as small ones."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = _round_keys(seed, epoch, rounds)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    out = feistel(np.asarray(index, dtype=np.uint64))
    while (outside := out >= np.uint64(n)).any():
        out[outside] = feistel(out[outside])
    return out.astype(np.int64)


# --- writing ---------------------------------------------------------------------------------------


def write_shards(
    token_docs: Iterable[Sequence[int] | np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eos_id: int | None = None,
    dtype: str = "uint32",
) -> Path:
    """Write documents (token id sequences) as one stream of shards of at most `shard_tokens`
    tokens, each document followed by `eos_id` when given. index.json is written last (temporary
    name, then rename), so a directory with an index has all its shards."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be ≥ 1, not {shard_tokens}")
    np_dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0
    documents = 0

    def emit(tokens: np.ndarray) -> None:
        name = f"shard-{len(shards):05d}.bin"
        tokens.astype(np_dtype).tofile(out / name)
        shards.append({"file": name, "tokens": len(tokens)})

    tail = [] if eos_id is None else [eos_id]
    for doc in token_docs:
        tokens = np.asarray([*doc, *tail] if tail else doc, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(np_dtype).max):
            raise ValueError(f"document {documents}: token ids must fit {dtype}")
        pending.append(tokens)
        pending_tokens += len(tokens)
        documents += 1
        while pending_tokens >= shard_tokens:  # documents run on across shard boundaries
            stream = np.concatenate(pending)
            emit(stream[:shard_tokens])
            pending, pending_tokens = [stream[shard_tokens:]], len(stream) - shard_tokens
    if pending_tokens:
        emit(np.concatenate(pending))
    index = {"format": FORMAT, "dtype": dtype, "shards": shards, "documents": documents}
    temporary = out / f".{INDEX}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, out / INDEX)
    return out
