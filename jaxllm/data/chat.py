"""Conversation records to `(token_ids, loss_mask)`: the data side of supervised fine-tuning.

Record formats (TRL's dataset formats; field names configurable with `ChatFields`):
- `messages`: a list of `{role, content}` (multi-turn, optional system message); needs a chat template.
- `prompt` + `completion`: two strings, concatenated without a template (TRL's standard format; loss on the
  completion); or two message lists (TRL's conversational prompt-completion), rendered as one conversation
  with the loss on the completion's assistant turns.
- `text`: plain text, loss on every token.
A record is read as the first of these whose fields it has. Records without a template (plain text, string
prompt + completion) end with the tokenizer's EOS, as TRL appends it, so the model learns to stop.

Token ids are those of transformers' `tokenizer.apply_chat_template(messages, tokenize=True)`: the whole
rendered text tokenized at once, no special tokens added beyond what the template writes. The loss mask is 1 on
the tokens of each assistant turn (a token counts when its character span overlaps the turn's span, the rule of
transformers' `return_assistant_tokens_mask`):
- templates with `{% generation %}` markers: the spans the markers wrap (then the mask equals transformers');
- other templates: the assistant's content and the end-of-turn text the template writes after it (`<|im_end|>`,
  `<|eot_id|>`, `</s>`), without the whitespace that separates it from the next turn. The span is found by
  rendering prefixes: render(messages[:i], add_generation_prompt=True) must begin render(messages[:i+1]), which
  must begin the whole conversation; the assistant turn is the rest. Templates that rewrite earlier turns when
  a later one is added (e.g. Mistral v0.3 moves the system prompt into the last user turn) fail this and are a
  one-line error.
`train_on_all=True` sets the mask to 1 everywhere (no spans are computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from jaxllm.config import JaxllmError
from jaxllm.data.chat_template import ChatTemplate, Span
from jaxllm.data.readers import RecordError
from jaxllm.data.tokenizer import Tokenizer

_LOSS_ROLE = "assistant"


@dataclass(frozen=True)
class ChatFields:
    """Names of the record fields that hold each format."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """1 for each token whose character span overlaps one of `spans` (sorted), as transformers computes
    `assistant_masks`."""
    mask = [0] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask


class ChatEncoder:
    """Turns records into `(token_ids, loss_mask)` with one tokenizer and chat template (None: plain text and
    string prompt + completion only). See the module docstring for formats and masks."""

    def __init__(self, tokenizer: Tokenizer, template: Optional[ChatTemplate],
                 fields: ChatFields = ChatFields(), train_on_all: bool = False, bos_id: Optional[int] = None):  # fmt: skip
        self.tokenizer = tokenizer
        self.bos_id = bos_id  # put first in records rendered without a template (templates write their own)
        self.template = template
        self.fields = fields
        self.train_on_all = train_on_all
        self.variables = tokenizer.special_tokens() if template is not None else {}

    def encode(self, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        f = self.fields
        if f.messages in record:
            return self.encode_messages(self._messages(record, f.messages))
        if f.prompt in record and f.completion in record:
            prompt, completion = record[f.prompt], record[f.completion]
            if isinstance(prompt, str) and isinstance(completion, str):  # TRL's standard format: no template
                return self._encode_plain(prompt, completion)
            if isinstance(prompt, list) and isinstance(completion, list):
                prompt, completion = self._messages(record, f.prompt), self._messages(record, f.completion)
                return self.encode_messages(prompt + completion, loss_from=len(prompt))
            raise RecordError(f"fields {f.prompt!r} and {f.completion!r} must both be strings or both lists of "
                              f"messages, got {type(prompt).__name__} and {type(completion).__name__}")  # fmt: skip
        if f.text in record:
            text = record[f.text]
            if not isinstance(text, str):
                raise RecordError(f"field {f.text!r} holds {type(text).__name__}, expected a string")
            return self._encode_plain("", text)
        raise RecordError(
            f"the record has none of the fields {f.messages!r}, {f.prompt!r} + {f.completion!r}, {f.text!r} (it has "
            f"{', '.join(map(repr, record)) or 'none'}); set data.objective.messages_field / prompt_field / "
            "completion_field, or the source's text_field, to the fields that hold it"
        )

    def encode_messages(self, messages: list[dict], loss_from: int = 0) -> tuple[list[int], list[int]]:
        """Ids and mask of a conversation; assistant turns before `messages[loss_from]` stay masked out."""
        template = self.template
        if template is None:
            raise JaxllmError(
                "records in the messages format need a chat template; choose one (a tokenizer directory's, a .jinja "
                "file, or builtin:chatml / builtin:llama3 / builtin:zephyr)"
            )
        if self.train_on_all:
            ids, _ = self.tokenizer.encode_with_offsets(template.render(messages, variables=self.variables))
            return ids, [1] * len(ids)
        if template.has_generation_markers:
            text, spans = template.render_with_spans(messages, self.variables)
            if loss_from > 0:
                prompt_end = len(template.render(messages[:loss_from], True, self.variables))
                spans = [s for s in spans if s[1] > prompt_end]
        else:
            text, spans = self._assistant_spans(messages, loss_from)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        return ids, spans_to_mask(offsets, spans)

    def _assistant_spans(self, messages: list[dict], loss_from: int) -> tuple[str, list[Span]]:
        render, variables = self.template.render, self.variables
        text = render(messages, variables=variables)
        spans = []
        for i in range(loss_from, len(messages)):
            if messages[i]["role"] != _LOSS_ROLE:
                continue
            before = render(messages[:i], True, variables)
            upto = render(messages[: i + 1], False, variables)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise JaxllmError(
                    f"chat template {self.template.name} does not render the conversation turn by turn (the text "
                    f"before assistant message {i} changes when later messages are added), so its tokens cannot "
                    "be found; use a template with {% generation %} markers, another template, or train on all tokens"
                )
            spans.append((len(before), max(len(before), len(upto.rstrip()))))
        return text, spans

    def _encode_plain(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """`prompt + completion` without a template, then EOS; the loss on the completion's tokens and EOS."""
        text = prompt + completion
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        all_tokens = self.train_on_all or not prompt
        mask = [1] * len(ids) if all_tokens else spans_to_mask(offsets, [(len(prompt), len(text))])
        if self.tokenizer.eos_id is not None:
            ids, mask = ids + [self.tokenizer.eos_id], mask + [1]
        if self.bos_id is not None:
            ids, mask = [self.bos_id, *ids], [0, *mask]
        return ids, mask

    @staticmethod
    def _messages(record: Mapping[str, Any], field: str) -> list[dict]:
        messages = record[field]
        if not isinstance(messages, list) or not messages:
            raise RecordError(f"field {field!r} must hold a non-empty list of messages, got {messages!r:.80}")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
                raise RecordError(f"field {field!r}: each message needs a 'role' string and a 'content', got {m!r:.80}")
        return messages
