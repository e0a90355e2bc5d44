"""Conversation -> token ids + labels, with the tokenizer's own chat template.

Only assistant tokens are trained on. To find them for ANY Hugging Face chat template (most
have no `{% generation %}` markers), each assistant turn is located by rendering prefixes of
the conversation and comparing token counts:

    start = len(ids(messages[:i], add_generation_prompt=True))   # ... up to "<|assistant|>"
    end   = len(ids(messages[:i + 1]))                            # ... + "answer<|end|>"

so the trained span is the answer plus whatever the template closes the turn with (the
end-of-turn token, so the model learns to stop). This is only valid if the template is
prefix-stable (rendering a prefix gives a prefix of the full token sequence); that is checked
for every turn and a template that breaks it raises `ChatTemplateError`.
"""

import functools
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from lightning_moe.data.records import Message
from lightning_moe.tokens import IGNORE_INDEX


class ChatTemplateError(ValueError):
    """The chat template cannot be used for assistant-only labels (a property of the template, not of a record)."""


class TemplateRejectedError(ValueError):
    """The chat template raised on this conversation (e.g. roles that do not alternate)."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]  # the whole conversation, at most max_length tokens
    labels: list[int]  # IGNORE_INDEX except on assistant tokens
    prompt_ids: list[int]  # up to and including the generation prompt of the last assistant turn (not truncated)
    answer: str  # the last assistant turn's text, stripped: the reference for exact match
    truncated: bool  # the conversation was longer than max_length

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class ConversationTokenizer:
    """Applies a tokenizer's chat template and labels the assistant spans (see module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} has no chat template; pass chat_template= to load_tokenizer"
            )
        self.tokenizer = tokenizer
        # Instruction data repeats prompts (and synthetic data whole conversations): a bounded
        # per-instance cache makes setup several times faster there and costs little elsewhere.
        self._cached_ids = functools.lru_cache(maxsize=65536)(self._render_ids)

    def ids(self, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered messages (the template writes BOS etc. itself, as HF does)."""
        return list(self._cached_ids(tuple((m.role, m.content) for m in messages), add_generation_prompt))

    def _render_ids(self, messages: tuple[tuple[str, str], ...], add_generation_prompt: bool) -> tuple[int, ...]:
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            raise TemplateRejectedError(f"the chat template rejected the conversation: {e}") from e
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, messages: list[Message], max_length: int) -> TokenizedConversation:
        input_ids = self.ids(messages)
        labels = [IGNORE_INDEX] * len(input_ids)
        prompt_ids: list[int] = []
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt_ids = self.ids(messages[:i], add_generation_prompt=True)
            turn_ids = self.ids(messages[: i + 1]) if i + 1 < len(messages) else input_ids
            start, end = len(prompt_ids), len(turn_ids)
            if input_ids[:start] != prompt_ids or input_ids[:end] != turn_ids or start > end:
                raise ChatTemplateError(
                    "the chat template is not prefix-stable (rendering the first turns does not give a prefix of "
                    f"the whole conversation), so assistant tokens cannot be located; turn {i}: "
                    f"{self.tokenizer.decode(input_ids)!r} vs {self.tokenizer.decode(turn_ids)!r}"
                )
            labels[start:end] = input_ids[start:end]
        answer = next(m.content for m in reversed(messages) if m.role == "assistant").strip()
        truncated = len(input_ids) > max_length
        return TokenizedConversation(input_ids[:max_length], labels[:max_length], prompt_ids, answer, truncated)
