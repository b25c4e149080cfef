"""A checkpoint's tokenizer as the server needs it: encode with the checkpoint's BOS rule, decode,
end-of-sequence ids, the chat template, and incremental detokenizing for streaming.

Reads the Hugging Face files directly (`tokenizer.json` through the `tokenizers` library,
`tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`), so serving does not
need `transformers`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The chat template cannot render these messages (or the checkpoint has no template)."""


def _token_content(value: Any) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _select_chat_template(value: Any) -> str | None:
    """`chat_template` is one string or a list of {name, template}: take the one named default."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default") if "default" in named else next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    # Unlike jinja2's own tojson, templates expect plain JSON (no HTML escaping), non-ASCII kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """The template in an environment set up the way chat templates are written for."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ServeTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        # None: the checkpoint does not say, so the tokenizer.json post-processor decides.
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        if add_bos_token and self.bos_token_id is None:
            raise ValueError(f"add_bos_token is set but the BOS token {bos_token!r} is not in the vocabulary")
        eos = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: set[int] = eos
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self._special_tokens = dict(special_tokens or {})
        if bos_token:
            self._special_tokens.setdefault("bos_token", bos_token)
        if eos_token:
            self._special_tokens.setdefault("eos_token", eos_token)

    @classmethod
    def from_pretrained(cls, model_dir: Path | str) -> ServeTokenizer:
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} is missing: the server reads the fast tokenizer file")
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")

        special = {k: v for k in _SPECIAL_TOKEN_KEYS if (v := _token_content(config.get(k))) is not None}
        template_file = model_dir / "chat_template.jinja"
        template: str | None
        if template_file.is_file():  # newer checkpoints keep the template beside the config
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _select_chat_template(config.get("chat_template"))
        gen_eos = generation.get("eos_token_id")
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        extra_eos = [i for i in gen_eos or () if isinstance(i, int)]
        add_bos = config.get("add_bos_token")
        return cls(
            Tokenizer.from_file(str(tokenizer_file)),
            bos_token=special.get("bos_token"),
            eos_token=special.get("eos_token"),
            add_bos_token=bool(add_bos) if add_bos is not None else None,
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=template,
            special_tokens=special,
            extra_eos_token_ids=extra_eos,
        )

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        result = self._tok.token_to_id(token)
        return int(result) if result is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, BOS (and EOS) as the checkpoint asks,
        exactly once whether or not tokenizer.json's post-processor adds them too."""
        if self.add_bos_token is None:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The conversation rendered as the model's prompt text (BOS included when the template
        writes it; encode the result with `add_special_tokens=False`). Extra keyword arguments
        become template variables (e.g. `tools`, or a template's own switches)."""
        if self._template is None:
            raise ChatTemplateError("this model's tokenizer has no chat template; use /v1/completions")
        variables: dict[str, Any] = {**self._special_tokens, **kwargs}
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """The rendered conversation's token ids; the template's own BOS is the only one."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of generated tokens into text deltas.

    Each step decodes a short window of recent tokens and emits what the new tokens added to it,
    so decoders that depend on neighbours (leading spaces, byte fallback) give the same text as
    decoding everything at once. While the text ends in U+FFFD the tail is an incomplete
    multi-byte character split across tokens, and it is held back until the rest arrives."""

    # The tokens of one UTF-8 character: each token carries at least one byte, a character at
    # most four. A longer undecodable tail is really invalid bytes and is let through.
    _MAX_HELD_TOKENS = 4
    _PROMPT_CONTEXT = 4

    def __init__(
        self, tokenizer: ServeTokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-self._PROMPT_CONTEXT :]) if prompt_ids else []
        self._ids: list[int] = context
        # Text of ids[_prefix:_read] was emitted already; ids[_read:] are not yet emitted.
        self._prefix = 0
        self._read = len(context)
        self.text = ""  # everything emitted so far

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._prefix :]

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated tokens; returns the text they complete (possibly empty)."""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, undecodable bytes included."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        incomplete = after.endswith(REPLACEMENT_CHAR)
        held = len(self._ids) - self._read
        if incomplete and not final and held < self._MAX_HELD_TOKENS:
            return ""
        # Shorter when the new tokens were special ones being skipped.
        delta = after[len(before) :] if len(after) > len(before) else ""
        self._prefix = self._read
        self._read = len(self._ids)
        self.text += delta
        return delta
