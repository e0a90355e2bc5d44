"""Conversation -> tokens / labels: exactly the assistant tokens (and their end-of-turn) are trained,
on the shipped template and on a ChatML template over a byte-level BPE tokenizer."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_moe.data import ChatTemplateError, ConversationTokenizer, Message, load_tokenizer
from lightning_moe.tokens import IGNORE_INDEX

TWO_TURNS = [
    Message("system", "Answer the question."),
    Message("user", "<image>\nHow many shapes are there?"),
    Message("assistant", "two"),
    Message("user", "Is there a circle in the image?"),
    Message("assistant", " yes "),
]

# ChatML with a default system prompt (as Qwen2) and {% generation %} markers, so that Hugging
# Face's own assistant mask can serve as the oracle for the prefix-diff labels.
CHATML = (
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}{% generation %}{{- m['content'] + '<|im_end|>\\n' -}}{% endgeneration %}"
    "{%- else -%}{{- m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def bpe_chatml(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 style) with a ChatML template, loaded through load_tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["How many shapes are there? two three", "Is there a circle in the image? yes no", "system user assistant"]
    backend.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=CHATML)
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    return load_tokenizer(str(path))


def test_shipped_template_trains_exactly_the_answers_and_their_end_of_turn(tokenizer):
    out = ConversationTokenizer(tokenizer)(TWO_TURNS, max_length=128)
    tokens = tokenizer.convert_ids_to_tokens(out.input_ids)
    assert tokens == [
        "<s>", "<|system|>", "answer", "the", "question", ".", "<|end|>",
        "<|user|>", "<image>", "how", "many", "shapes", "are", "there", "?", "<|end|>",
        "<|assistant|>", "two", "<|end|>",
        "<|user|>", "is", "there", "a", "circle", "in", "the", "image", "?", "<|end|>",
        "<|assistant|>", "yes", "<|end|>",
    ]  # fmt: skip
    trained = [(i, tokens[i]) for i, label in enumerate(out.labels) if label != IGNORE_INDEX]
    assert trained == [(17, "two"), (18, "<|end|>"), (30, "yes"), (31, "<|end|>")]
    assert all(out.labels[i] == out.input_ids[i] for i, _ in trained)
    # the prompt of the last turn ends with its generation prompt; the reference answer is stripped.
    assert out.prompt_ids == out.input_ids[:30] and tokens[29] == "<|assistant|>"
    assert out.answer == "yes" and not out.truncated and out.num_trained == 4


def test_placeholder_stays_one_token(tokenizer):
    out = ConversationTokenizer(tokenizer)(TWO_TURNS, max_length=128)
    assert out.input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1


def test_truncation_cuts_input_and_labels_together(tokenizer):
    out = ConversationTokenizer(tokenizer)(TWO_TURNS, max_length=18)
    assert len(out.input_ids) == len(out.labels) == 18 and out.truncated
    assert out.num_trained == 1  # "two" survives, its end-of-turn does not
    assert len(out.prompt_ids) == 30  # the generation prompt is never truncated


def test_chatml_bpe_labels_match_hf_generation_mask(bpe_chatml):
    messages = TWO_TURNS[1:]  # no system message: the template inserts its default one
    out = ConversationTokenizer(bpe_chatml)(messages, max_length=512)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    hf = bpe_chatml.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    assert out.input_ids == hf["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in out.labels] == hf["assistant_masks"]
    trained = [t for t, label in zip(out.input_ids, out.labels) if label != IGNORE_INDEX]
    assert bpe_chatml.decode(trained) == "two<|im_end|>\n yes <|im_end|>\n"
    assert bpe_chatml.decode(out.prompt_ids).endswith("<|im_start|>assistant\n")


def test_load_tokenizer_adds_placeholders_and_pad_to_any_tokenizer(bpe_chatml):
    for placeholder in ("<image>", "<audio>", "<video>"):
        ids = bpe_chatml("x" + placeholder + "\ny", add_special_tokens=False)["input_ids"]
        assert ids.count(bpe_chatml.convert_tokens_to_ids(placeholder)) == 1
    assert bpe_chatml.pad_token is not None and bpe_chatml.pad_token_id < len(bpe_chatml)


def test_template_that_is_not_prefix_stable_is_refused(tokenizer, tmp_path):
    # assistant turns start with "answer" but the generation prompt is "question" (both in the vocabulary).
    unstable = (
        "{% for m in messages %}{{ ('answer ' if m['role'] == 'assistant' else 'the ') + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}question {% endif %}"
    )
    tokenizer.save_pretrained(tmp_path)
    other = load_tokenizer(str(tmp_path), chat_template=unstable)
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        ConversationTokenizer(other)(TWO_TURNS[1:3], max_length=64)


def test_tokenizer_without_chat_template_is_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    other = load_tokenizer(str(tmp_path))
    other.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ConversationTokenizer(other)


def _alternating(turns: int, system: bool = False) -> list[Message]:
    """`turns` distinct user / assistant turns (distinct: no rendering is a cache hit), after a system message."""
    head = [Message("system", "Answer the question.")] if system else []
    return head + [Message("user" if i % 2 == 0 else "assistant", f"turn {i} is there a circle") for i in range(turns)]


@pytest.mark.parametrize("system", [False, True])
def test_spans_from_increments_are_those_of_the_prefix_renderings(tokenizer, bpe_chatml, system):
    # the prefix renderings (the definition, in the module docstring) are the oracle of the increments
    for tok in (tokenizer, bpe_chatml):
        for messages in (_alternating(7, system), _alternating(8, system), _alternating(41, system),
                         TWO_TURNS[: 3 + int(system)]):
            chat = ConversationTokenizer(tok)
            ids = chat.ids(messages)
            spans = chat._spans_by_increments(messages, chat.text(messages), ids)
            assert spans is not None and spans == chat._spans_by_prefixes(messages, ids)
            labels = [IGNORE_INDEX] * len(ids)
            for start, end in spans:
                labels[start:end] = ids[start:end]
            assert ConversationTokenizer(tok)(messages, max_length=4096).labels == labels


def test_long_conversation_renders_a_number_of_messages_linear_in_its_turns(tokenizer, monkeypatch):
    rendered = []  # messages passed to the chat template, per rendering: the work of rendering
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda chat, **k: rendered.append(len(chat)) or render(chat, **k))

    def work(turns: int) -> int:
        rendered.clear()
        out = ConversationTokenizer(tokenizer)(_alternating(turns), max_length=64)
        assert out.num_trained > 0 and out.truncated
        return sum(rendered)

    small, large = work(1000), work(4000)
    # the whole conversation once, then a window of at most three messages a few times per turn: 4x the turns,
    # ~4x the messages rendered (rendering every prefix grows 16x)
    assert 3.5 < large / small < 4.5 and small < 12 * 1000
