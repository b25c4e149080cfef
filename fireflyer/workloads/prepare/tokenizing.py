"""The model's tokenizer as the preparation uses it: tokenizer.json through the `tokenizers`
library, no special tokens inside a document, the EOS id between documents (as the trainer
expects: one stream, documents separated by EOS)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fireflyer.errors import FireflyerError

BATCH_DOCUMENTS = 1024


class PrepareError(FireflyerError):
    """Input or a tokenizer that cannot be prepared; the message names the file."""


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PrepareError(f"{path}: not JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def load_tokenizer(model_dir: Path) -> tuple[Any, int]:
    """(the tokenizer, its EOS id). The EOS comes from tokenizer_config.json's eos_token, else
    from config.json's eos_token_id."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise PrepareError(f"{path}: not found (--tokenizer must be a model directory with tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception for a malformed file
        raise PrepareError(f"{path}: not a tokenizer ({error})") from None
    eos = _json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    eos_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    if eos_id is None:
        configured = _json(model_dir / "config.json").get("eos_token_id")
        if isinstance(configured, list) and configured:
            configured = configured[0]
        eos_id = configured if isinstance(configured, int) else None
    if eos_id is None:
        raise PrepareError(
            f"{model_dir}: no EOS token (tokenizer_config.json eos_token or config.json eos_token_id)"
        )
    return tokenizer, int(eos_id)


@dataclass
class TokenizeTable:
    """smallpond ArrowComputeNode process function: (file_index, line, text) rows → (file_index,
    line, tokens, n_tokens). Loads the tokenizer once per process, on first use."""

    model_dir: str
    _tokenizer: Any = field(default=None, repr=False)

    def __call__(self, _runtime_ctx: Any, tables: list[Any]) -> Any:
        import pyarrow as pa

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(Path(self.model_dir))[0]
        table = tables[0]
        texts = table.column("text").to_pylist()
        ids: list[list[int]] = []
        for start in range(0, len(texts), BATCH_DOCUMENTS):
            batch = self._tokenizer.encode_batch(
                texts[start : start + BATCH_DOCUMENTS], add_special_tokens=False
            )
            ids.extend(encoding.ids for encoding in batch)
        return pa.table(
            {
                "file_index": table.column("file_index"),
                "line": table.column("line"),
                "tokens": pa.array(ids, type=pa.list_(pa.uint32())),
                "n_tokens": pa.array([len(i) for i in ids], type=pa.int64()),
            }
        )
