"""A small byte-level BPE tokenizer in DeepSeek-V3's file layout, for random-weight checkpoints.

The vocabulary is trained with the `tokenizers` library on a corpus kept in this module, so every
run writes the same bytes and no hub download is ever needed. Special tokens use DeepSeek-V3's
spelling (full-width bars, `▁` for spaces); bos is id 0 and eos id 1, as in the real checkpoint.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# Order fixes the ids: the trainer puts special tokens first.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

VOCAB_TARGET = 1000
DEFAULT_MODEL_MAX_LENGTH = 16384

# DeepSeek-V3's template in spirit: bos, the system prompts, then alternating user and assistant
# turns, each assistant turn closed by eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT + "' + message['content'] + '" + EOS + "' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{%- endif %}"
)

CORPUS = """\
The harbour was quiet before dawn. A few boats rocked against the pier, and the water carried the
smell of salt, rope and diesel. An old fisherman sat on a crate, mending a net with slow, patient
hands. He had done this every morning for forty years, and he said the sea had never once been the
same twice. Some days it was grey and flat like a sheet of metal; other days it was green, restless
and full of light.

When the sun came up, the market opened. Traders set out tables of bread, cheese, apples, onions and
fresh fish. Children ran between the stalls while their parents argued about prices. A woman sold
honey in small glass jars, and a man with a red hat played the violin near the fountain. Nobody
paid him much attention, but everyone would have noticed if he had stopped.

Computers are machines that follow instructions. A program is a list of those instructions, written
in a language that people can read and that a compiler can translate. Good programs are simple:
each function does one thing, names say what they mean, and errors are reported clearly instead of
being hidden. A test checks that the program does what we expect. When a test fails, we learn
something, and that is the point of writing it.

A language model predicts the next token from the tokens before it. The text is split into pieces,
each piece is turned into a number, and the numbers are turned into vectors. Layers of attention let
every position look back at earlier positions, and feed forward layers transform what they find. A
mixture of experts sends each token to a few of many small networks, chosen by a router, so that the
model can be large while each step stays cheap. Training adjusts millions of weights so that the
predictions become a little less wrong, again and again, over a very large amount of text.

The train left the station at seven minutes past nine. Through the window the fields went by: wheat,
then barley, then a long row of poplar trees bending in the wind. A student opened a book about the
history of mathematics and read about Euclid, about zero, about the slow invention of algebra. The
conductor checked the tickets and wished everyone a pleasant journey. At the next town, three people
got off and five got on, carrying bags, umbrellas and a small dog in a basket.

Weather changes quickly in the mountains. In the morning the sky can be clear and blue, and by the
afternoon clouds gather around the peaks and the temperature falls. Walkers should carry water, a
warm coat, a map and something to eat. It is better to turn back early than to be caught on a narrow
ridge in the rain. The path down to the valley passes a lake, a wooden bridge and a farm where goats
watch the visitors with calm, yellow eyes.

Cooking is a kind of chemistry that you can eat. Heat changes the proteins in an egg; sugar turns to
caramel; dough rises because yeast makes gas. A simple soup needs only a few things: an onion, a
carrot, some potatoes, water, salt and time. Stir it now and then, taste it, and add pepper at the
end. Serve it with bread and share it with friends, because food always tastes better together.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
Question: What do plants need to grow? Answer: Plants need light, water, air and soil.
Question: Why is the sky blue? Answer: Sunlight is scattered by the air, and blue light is
scattered more than red light, so the sky looks blue during the day.

Numbers appear everywhere: 1, 2, 3, 10, 42, 100, 365, 1024, 2025. A year has 12 months and 52 weeks.
Water boils at 100 degrees and freezes at 0. The distance was 3.5 kilometres, and the walk took about
45 minutes. Prices rose by 2% last year; the report listed them in a table with columns for the item,
the old price, the new price and the change.

Hello! How are you today? I am well, thank you. Could you help me with a small problem? Of course,
tell me what it is. My program prints the wrong answer when the list is empty. Then check the case
where there are no items first, and return early. Thank you, that fixed it. You are welcome; good luck
with the rest of your project.

In the evening the library was almost empty. A lamp glowed over a long table covered with papers,
letters and photographs. The historian was writing a story about the town: how the river had flooded
the streets a century ago, how the people rebuilt the houses with stone, how the bridge was opened
with music and speeches. She worked until the light outside had gone, then closed her notebook,
turned off the lamp and walked home under the stars.
"""


def build_tokenizer() -> Tokenizer:
    """The trained tokenizer, with bos prepended to every encoding by the post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, BOS_ID)],
    )
    for token, expected in ((BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID)):
        if tokenizer.token_to_id(token) != expected:
            raise RuntimeError(f"{token} has id {tokenizer.token_to_id(token)}, expected {expected}")
    return tokenizer


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return build_tokenizer().to_str(pretty=True)


def tokenizer_vocab_size() -> int:
    """Number of ids the tokenizer can produce (the model's vocab_size is this rounded up)."""
    return Tokenizer.from_str(_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict[str, object]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out: Path, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> int:
    """Writes tokenizer.json and tokenizer_config.json into `out`; returns the vocabulary size."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_tokenizer_json() + "\n", encoding="utf-8")
    config = tokenizer_config(model_max_length)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return tokenizer_vocab_size()
