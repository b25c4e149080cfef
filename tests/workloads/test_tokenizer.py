"""ServeTokenizer against transformers' AutoTokenizer on a `model init` checkpoint, the
tokenizer_config.json variants real checkpoints use, the chat template environment, and
incremental detokenizing."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from fireflyer.workloads.serve.tokenizer import ChatTemplateError, IncrementalDetokenizer, ServeTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
BOS_ID = 0  # as in DeepSeek-V3's vocabulary

TEXTS = [
    "",
    "Hello! How are you today?",
    "  leading spaces and trailing  ",
    "The harbour was quiet before dawn.\n\nNew paragraph\twith a tab.",
    "深度求索 DeepSeek 你好，世界。",
    "emoji 🙂🚀 and accents: café, naïve, Zürich",
    f"{USER}special tokens inline{ASSISTANT}and{EOS}",
    "numbers 3.14159 and 2025 and 1024",
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of 日本? 🙂"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fireflyer.workloads.model.init import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny")


@pytest.fixture(scope="module")
def tok(checkpoint: Path) -> ServeTokenizer:
    return ServeTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def hf(checkpoint: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


def _hf_chat_ids(hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = out["input_ids"] if not isinstance(out, list) else out  # a BatchEncoding in transformers 5
    return list(ids)


def _variant(src: Path, dst: Path, **config_changes: Any) -> Path:
    """A copy of the checkpoint's tokenizer files with tokenizer_config.json keys changed
    (a value of None deletes the key)."""
    dst.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return dst


def _drop_bos_post_processor(path: Path) -> None:
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# -- against transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: ServeTokenizer, hf: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert ids[0] == tok.bos_token_id == BOS_ID
    assert ids.count(BOS_ID) == 1
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok: ServeTokenizer, hf: Any, skip: bool) -> None:
    for text in TEXTS:
        ids = [*tok.encode(text), tok.eos_token_id or 0]
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(tok.encode(TEXTS[4])) == TEXTS[4]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: ServeTokenizer, hf: Any, add_generation_prompt: bool
) -> None:
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    ids = tok.encode_chat(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert ids == _hf_chat_ids(hf, CONVERSATION, add_generation_prompt)
    assert ids.count(BOS_ID) == 1  # the template's bos, no second one from encoding


def test_special_tokens_and_eos(tok: ServeTokenizer, checkpoint: Path) -> None:
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert tok.bos_token == BOS
    assert tok.eos_token == EOS
    assert tok.eos_token_id == tok.token_to_id(EOS)
    assert generation["eos_token_id"] in tok.eos_token_ids
    assert tok.vocab_size > 256


# -- tokenizer_config.json variants ------------------------------------------------------------


def test_added_token_dicts_and_generation_eos_list(checkpoint: Path, tmp_path: Path) -> None:
    path = _variant(
        checkpoint,
        tmp_path / "v",
        bos_token={"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True},
        eos_token={"__type": "AddedToken", "content": EOS, "rstrip": False},
    )
    user_id = ServeTokenizer.from_pretrained(path).token_to_id(USER)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, user_id]}))
    tok = ServeTokenizer.from_pretrained(path)
    assert tok.bos_token == BOS and tok.eos_token == EOS
    assert tok.eos_token_ids == {tok.token_to_id(EOS), user_id}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith(BOS)


def test_bos_exactly_once_whatever_the_post_processor(checkpoint: Path, tmp_path: Path) -> None:
    with_pp = ServeTokenizer.from_pretrained(checkpoint)
    path = _variant(checkpoint, tmp_path / "no-pp")
    _drop_bos_post_processor(path)
    without_pp = ServeTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert with_pp.encode(text) == without_pp.encode(text)
        assert with_pp.encode(text).count(BOS_ID) == 1


def test_add_bos_token_false_and_absent(checkpoint: Path, tmp_path: Path) -> None:
    off = ServeTokenizer.from_pretrained(_variant(checkpoint, tmp_path / "off", add_bos_token=False))
    assert off.bos_token_id not in off.encode("Hello")
    # Not stated: the tokenizer.json post-processor decides (this one adds bos).
    absent = ServeTokenizer.from_pretrained(_variant(checkpoint, tmp_path / "absent", add_bos_token=None))
    assert absent.encode("Hello")[0] == absent.bos_token_id
    assert absent.encode("Hello", add_special_tokens=False)[0] != absent.bos_token_id
    eos = ServeTokenizer.from_pretrained(_variant(checkpoint, tmp_path / "eos", add_eos_token=True))
    assert eos.encode("Hello")[-1] == eos.eos_token_id


def test_chat_template_list_and_jinja_file(checkpoint: Path, tmp_path: Path) -> None:
    listed = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT{{ bos_token }}"},
    ]
    path = _variant(checkpoint, tmp_path / "list", chat_template=listed)
    assert ServeTokenizer.from_pretrained(path).apply_chat_template([]) == "DEFAULT" + BOS
    (path / "chat_template.jinja").write_text("FILE {{ messages | length }}", encoding="utf-8")
    assert ServeTokenizer.from_pretrained(path).apply_chat_template(CONVERSATION) == "FILE 4"


def test_missing_template_and_missing_tokenizer_json(checkpoint: Path, tmp_path: Path) -> None:
    tok = ServeTokenizer.from_pretrained(_variant(checkpoint, tmp_path / "none", chat_template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        ServeTokenizer.from_pretrained(tmp_path / "empty")


# -- the template environment ------------------------------------------------------------------

RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] %}
        {%- continue %}
    {%- endif %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
<｜User｜>{{ message['content'] }}
    {% else %}
<｜Assistant｜>{{ message['content'] }}{{ eos_token }}
    {%- if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif %}
    {% endif %}
    {%- if loop.index >= 6 %}{% break %}{% endif %}
{%- endfor %}
[{{ ns.system }}]
{%- if add_generation_prompt %}<｜Assistant｜>{% endif %}
{%- if thinking is defined and thinking %}<think>{% endif %}"""


def test_template_environment_matches_transformers(checkpoint: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = _variant(checkpoint, tmp_path / "rich", chat_template=RICH_TEMPLATE)
    tok = ServeTokenizer.from_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    messages: list[dict[str, Any]] = [
        *CONVERSATION,
        {"role": "assistant", "content": "東京", "tool_calls": [{"name": "f", "args": {"city": "東京"}}]},
    ]
    for kwargs in ({}, {"thinking": True}):
        ours = tok.apply_chat_template(messages, **kwargs)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert '{"city": "東京"}' in ours  # tojson keeps non-ASCII and does not HTML-escape
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_is_sandboxed(checkpoint: Path, tmp_path: Path) -> None:
    path = _variant(checkpoint, tmp_path / "evil", chat_template="{{ messages.append(1) }}{{ messages }}")
    with pytest.raises(ChatTemplateError):
        ServeTokenizer.from_pretrained(path).apply_chat_template(CONVERSATION)


# -- incremental detokenizing ------------------------------------------------------------------


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["🙂🚀🎉 日本語のテキスト ✓ € ü"])
def test_incremental_detokenizer_matches_full_decode(tok: ServeTokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer(prompt_ids=tok.encode("Question: "))
    deltas = _stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)  # no character is ever split


def test_multibyte_characters_are_held_until_complete(tok: ServeTokenizer) -> None:
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # the tiny vocabulary spells the emoji byte by byte
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_invalid_bytes_are_let_through(tok: ServeTokenizer) -> None:
    lead = tok.encode("🚀", add_special_tokens=False)[0]  # a lone 4-byte lead, never completed
    plain = tok.encode(" ok", add_special_tokens=False)
    detok = tok.detokenizer()
    text = "".join(_stream(detok, [lead, *plain]))
    assert text == tok.decode([lead, *plain])
    # A cut-off character at the very end comes out on flush.
    detok = tok.detokenizer()
    assert detok.add(lead) == ""
    assert detok.flush() == "\ufffd"


def test_detokenizer_skips_special_tokens_and_takes_batches(tok: ServeTokenizer) -> None:
    ids = [*tok.encode("Hello world", add_special_tokens=False), tok.eos_token_id or 0]
    detok = tok.detokenizer(skip_special_tokens=True)
    assert detok.add(ids) + detok.flush() == "Hello world"
    detok = tok.detokenizer(skip_special_tokens=False)
    assert detok.add(ids) == "Hello world" + EOS


def test_detokenizer_random_streams(tok: ServeTokenizer) -> None:
    rng = random.Random(0)
    pool = "".join(TEXTS) + "🙂🚀日本語"
    for _ in range(20):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text, add_special_tokens=False)
        assert "".join(_stream(tok.detokenizer(), ids)) == tok.decode(ids)
