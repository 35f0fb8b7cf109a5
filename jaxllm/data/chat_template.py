"""Chat templates: Hugging Face Jinja templates rendered exactly as `transformers`' `apply_chat_template`.

A `ChatTemplate` comes from a Hugging Face tokenizer directory (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`: a string, or a list of named templates of which "default" is used), from a `.jinja`
file, or from a built-in (`builtin:NAME`, see BUILTIN_TEMPLATES). Rendering uses the sandboxed Jinja
environment transformers builds (utils/chat_template_utils.py): trim_blocks, lstrip_blocks, the loop-controls
extension, `raise_exception` / `strftime_now` / `dict` / `namespace` globals, a `tojson` filter that does not
escape HTML, and the `{% generation %}...{% endgeneration %}` tag whose character spans are what
transformers' `return_assistant_tokens_mask` marks. The template sees `messages` (None values dropped),
`tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's special tokens as `bos_token`,
`eos_token`, ... (jaxllm.data.chat passes those). transformers is not imported.
"""

from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxllm.config import JaxllmError
from jaxllm.data.readers import RecordError

Span = tuple[int, int]


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while a tracker is active, records
    the body's character span in the output so far (as transformers' AssistantTracker does)."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self._tracking: ContextVar = ContextVar("generation_tracker", default=None)
        environment.extend(generation_tracker=self.track)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list[str], spans: list[Span]):
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in templates, without attribute access to the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes, as in transformers."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return env.from_string(source)


def _as_transformers_passes(message: dict) -> dict:
    """The message without None values, its reasoning under every name templates read (`reasoning_content`,
    `thinking`), as transformers hands messages to templates."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class ChatTemplate:
    """A Jinja chat template. `special_tokens`: tokens the template writes that the tokenizer should hold as
    single tokens (named by built-ins; empty for templates read from files, whose tokenizer has them)."""

    def __init__(self, source: str, name: str, special_tokens: Sequence[str] = ()):
        self.source = source
        self.name = name
        self.special_tokens = tuple(special_tokens)
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise JaxllmError(
                f"chat template {name} is not valid Jinja (line {e.lineno}: {' '.join(str(e.message).split())})"
            ) from None

    @property
    def has_generation_markers(self) -> bool:
        """True when the template marks assistant text with {% generation %} (the mask then follows the marks)."""
        return re.search(r"\{%-?\s*generation\s*-?%\}", self.source) is not None

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               variables: Optional[dict[str, Any]] = None) -> str:  # fmt: skip
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) renders it."""
        return self._render(messages, add_generation_prompt, variables or {}, None)

    def render_with_spans(self, messages: list[dict], variables: Optional[dict[str, Any]] = None
                          ) -> tuple[str, list[Span]]:  # fmt: skip
        """The rendered text and the character spans the {% generation %} blocks wrote, in order."""
        spans: list[Span] = []
        return self._render(messages, False, variables or {}, spans), spans

    def _render(self, messages, add_generation_prompt, variables, spans) -> str:
        messages = [_as_transformers_passes(m) for m in messages]
        kwargs = dict(variables, messages=messages, tools=None, documents=None,
                      add_generation_prompt=add_generation_prompt)  # fmt: skip
        try:
            if spans is None:
                return self._template.render(**kwargs)
            blocks: list[str] = []
            with self._template.environment.generation_tracker(blocks, spans):
                for block in self._template.generate(**kwargs):
                    blocks.append(block)
            return "".join(blocks)
        except jinja2.exceptions.TemplateError as e:
            message = " ".join(str(e).split())
            raise RecordError(f"chat template {self.name} rejected the conversation: {message}") from None

    def missing_tokens(self, token_to_id) -> list[str]:
        """The `special_tokens` that `token_to_id` (a Tokenizer's) does not know as single tokens."""
        return [t for t in self.special_tokens if token_to_id(t) is None]

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


# Built-in templates, for models that ship none: name -> (template, special tokens it needs, what it is).
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
        "ChatML (OpenHermes, Qwen2 without its default system prompt): <|im_start|>role\\ncontent<|im_end|>\\n",
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
        " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if"
        " loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if"
        " add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Llama-3 Instruct: bos_token, then <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>",
    ),
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content']"
        " + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] +"
        " eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] +"
        " eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif"
        " %}\n{% endfor %}",
        (),
        "Zephyr (HuggingFaceH4/zephyr-7b-beta): <|role|>\\ncontent + eos_token; the role tags are plain text, so"
        " it needs only the tokenizer's own EOS (e.g. SentencePiece models without added tokens)",
    ),
}


def builtin_template(name: str) -> ChatTemplate:
    if name not in BUILTIN_TEMPLATES:
        choices = ", ".join(f"builtin:{n}" for n in BUILTIN_TEMPLATES)
        raise JaxllmError(f"unknown chat template builtin:{name}; the built-in templates are {choices}")
    source, special_tokens, _ = BUILTIN_TEMPLATES[name]
    return ChatTemplate(source, f"builtin:{name}", special_tokens)


def template_from_tokenizer_config(config: dict, name: str) -> Optional[ChatTemplate]:
    """The `chat_template` of a parsed tokenizer_config.json (a string, or a list of {name, template} of which
    "default" is used), or None when it has none."""
    value = config.get("chat_template")
    if value is None:
        return None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise JaxllmError(f"{name} lists chat templates {sorted(map(str, named))} but none named 'default'; "
                              "pass the .jinja file of the one to use")  # fmt: skip
        value = named["default"]
    if not isinstance(value, str):
        raise JaxllmError(f"{name}: chat_template must be a string or a list of named templates")
    return ChatTemplate(value, name)


def load_chat_template(spec: str) -> ChatTemplate:
    """A template from `builtin:NAME`, a `.jinja` file, or a Hugging Face tokenizer directory
    (`chat_template.jinja`, else `chat_template` in `tokenizer_config.json`)."""
    if spec.startswith("builtin:"):
        return builtin_template(spec.removeprefix("builtin:"))
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "chat_template.jinja").is_file():
            return ChatTemplate((p / "chat_template.jinja").read_text(encoding="utf-8"), str(p / "chat_template.jinja"))
        config_path = p / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise JaxllmError(f"{config_path} is not valid JSON ({e})") from None
            template = template_from_tokenizer_config(config, str(config_path))
            if template is not None:
                return template
        builtins = ", ".join(f"builtin:{n}" for n in BUILTIN_TEMPLATES)
        raise JaxllmError(
            f"tokenizer directory {p} has no chat template (no chat_template.jinja, no chat_template in "
            f"tokenizer_config.json); pass a .jinja file or one of {builtins}"
        )
    if p.is_file():
        return ChatTemplate(p.read_text(encoding="utf-8"), str(p))
    raise JaxllmError(f"chat template {spec} does not exist; expected a .jinja file, a tokenizer directory, or "
                      f"builtin:NAME ({', '.join(BUILTIN_TEMPLATES)})")  # fmt: skip
