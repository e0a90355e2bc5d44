"""Conversation -> token ids + labels, with the tokenizer's own chat template.

Only assistant tokens are trained on. To find them for ANY Hugging Face chat template (most
have no `{% generation %}` markers), each assistant turn is located by rendering prefixes of
the conversation and comparing token counts:

    start = len(ids(messages[:i], add_generation_prompt=True))   # ... up to "<|assistant|>"
    end   = len(ids(messages[:i + 1]))                            # ... + "answer<|end|>"

so the trained span is the answer plus whatever the template closes the turn with (the
end-of-turn token, so the model learns to stop). This is only valid if the template is
prefix-stable (rendering a prefix gives a prefix of the full token sequence); a template that
breaks it raises `ChatTemplateError`.

Rendering every prefix costs time quadratic in the number of turns, so past a few turns the spans
are found from each turn's increment instead, rendered in a window of the turn and the one or two before it
(`ConversationTokenizer._spans_by_increments`): linear in the conversation's length. The increments
must add up to the whole conversation, text and tokens (which is what prefix stability means turn
by turn); where they do not, the prefixes are rendered as above, and decide.
"""

import functools
import itertools
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

    # Up to this many messages, rendering the prefixes costs less than the windows (fewer renderings, mostly
    # cached: instruction data repeats its prompts); past it, their quadratic cost dominates.
    MAX_MESSAGES_RENDERED_BY_PREFIXES = 16

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} has no chat template; pass chat_template= to load_tokenizer"
            )
        self.tokenizer = tokenizer
        # Instruction data repeats prompts (and synthetic data whole conversations), and the increments of
        # one conversation render the same short windows: a bounded per-instance cache of rendered texts.
        self._cached_text = functools.lru_cache(maxsize=65536)(self._render_text)
        self._cached_ids = functools.lru_cache(maxsize=65536)(self._render_ids)

    def ids(self, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered messages (the template writes BOS etc. itself, as HF does)."""
        return list(self._cached_ids(tuple((m.role, m.content) for m in messages), add_generation_prompt))

    def _render_ids(self, messages: tuple[tuple[str, str], ...], add_generation_prompt: bool) -> tuple[int, ...]:
        text = self._cached_text(messages, add_generation_prompt)
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The messages rendered by the chat template; `TemplateRejectedError` if it raises."""
        return self._cached_text(tuple((m.role, m.content) for m in messages), add_generation_prompt)

    def _render_text(self, messages: tuple[tuple[str, str], ...], add_generation_prompt: bool) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise TemplateRejectedError(f"the chat template rejected the conversation: {e}") from e

    def __call__(self, messages: list[Message], max_length: int) -> TokenizedConversation:
        input_ids = self.ids(messages)
        spans = None
        if len(messages) > self.MAX_MESSAGES_RENDERED_BY_PREFIXES:
            spans = self._spans_by_increments(messages, self.text(messages), input_ids)
        if spans is None:
            spans = self._spans_by_prefixes(messages, input_ids)
        labels = [IGNORE_INDEX] * len(input_ids)
        for start, end in spans:
            labels[start:end] = input_ids[start:end]
        prompt_ids = input_ids[: spans[-1][0]] if spans else []
        answer = next(m.content for m in reversed(messages) if m.role == "assistant").strip()
        truncated = len(input_ids) > max_length
        return TokenizedConversation(input_ids[:max_length], labels[:max_length], prompt_ids, answer, truncated)

    def _spans_by_increments(self, messages: list[Message], text: str, input_ids: list[int]) -> list[tuple[int, int]] | None:
        """(start, end) token span of each assistant turn, from each turn's increment rendered in a short window.

        Message j's increment is `text(window + [j]) - text(window)`, the window being the system message and the
        one or two messages before j (starting where the conversation's first non-system message sits, so that
        roles alternate as in the conversation and a template's first-message rules apply to the window's own
        first message, whose text cancels out). Rendering is linear in the conversation's length. The increments
        (and generation prompts) must add up to the whole conversation, text and tokens; else None, and the
        exact prefix renderings decide (`_spans_by_prefixes`).
        """
        first = 1 if messages[0].role == "system" else 0
        if len(messages) <= first or messages[first].role == "assistant":
            return None
        head = messages[:first]
        try:
            segments = [self.text(messages[: first + 1])]
            answer_segments = []  # index in segments of each assistant turn's answer (after its generation prompt)
            for j in range(first + 1, len(messages)):
                window = head + messages[j - 1 if (j - 1 - first) % 2 == 0 else j - 2 : j]
                before = self.text(window)
                increment = self.text(window + [messages[j]])
                if not increment.startswith(before):
                    return None
                increment = increment[len(before):]
                if messages[j].role != "assistant":
                    segments.append(increment)
                    continue
                prompt = self.text(window, add_generation_prompt=True)
                if not prompt.startswith(before) or not increment.startswith(prompt[len(before):]):
                    return None
                prompt = prompt[len(before):]
                segments += [prompt, increment[len(prompt):]]
                answer_segments.append(len(segments) - 1)
        except TemplateRejectedError:
            return None  # a window the template refuses: the whole conversation decides
        if "".join(segments) != text:
            return None
        pieces = self.tokenizer(segments, add_special_tokens=False)["input_ids"]
        if [t for piece in pieces for t in piece] != input_ids:
            return None  # a token across a turn boundary
        ends = list(itertools.accumulate(len(piece) for piece in pieces))
        return [(ends[k - 1], ends[k]) for k in answer_segments]

    def _spans_by_prefixes(self, messages: list[Message], input_ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) token span of each assistant turn, from rendering the prefixes (module docstring)."""
        spans = []
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
            spans.append((start, end))
        return spans
