"""Chat templates and assistant masks, token for token against transformers' apply_chat_template.

Tokenizers are tiny BPEs trained here (byte-level like Qwen2/Llama-3, Metaspace like Mistral/Gemma) with every
template's special tokens; the templates in tests/data/templates/ are copies of public models' templates
(Qwen2-Instruct, Llama-3-Instruct, Mistral-7B-Instruct-v0.3 without its tool branches, Gemma-it, and a ChatML
one with {% generation %} markers as TRL's training templates carry)."""

import json
from pathlib import Path

import pytest

from jaxllm.config import JaxllmError
from jaxllm.data.chat import ChatEncoder, ChatFields
from jaxllm.data.chat_template import BUILTIN_TEMPLATES, ChatTemplate, load_chat_template
from jaxllm.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "templates"
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>"]  # fmt: skip
SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "  Four, of course.  "},
    {"role": "user", "content": "And  3+3?\nShow the sum."},
    {"role": "assistant", "content": "Six: 3+3 = 6. Grüße!"},
]
CORPUS = [m["content"] for m in [SYSTEM, *TURNS]] + ["user assistant system model You are a helpful assistant."] * 3


def _write_tokenizer(directory: Path, kind: str, bos, eos, template: str, stored: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": "<unk>"}
    if stored == "jinja":
        (directory / "chat_template.jinja").write_text(template)
    elif stored == "list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                                   {"name": "default", "template": template}]  # fmt: skip
    elif stored == "config":
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _template(name: str) -> str:
    if name.startswith("builtin:"):
        return BUILTIN_TEMPLATES[name.removeprefix("builtin:")][0]
    return (TEMPLATES / f"{name}.jinja").read_text()


# template, tokenizer kind, bos, eos, how the template is stored, end-of-turn text, content trimmed, conversations
CASES = {
    "qwen2": ("bytelevel", None, "<|im_end|>", "config", "<|im_end|>", False, [TURNS, [SYSTEM, *TURNS]]),
    "llama3": ("bytelevel", "<|begin_of_text|>", "<|eot_id|>", "jinja", "<|eot_id|>", True, [[SYSTEM, *TURNS]]),
    "mistral_v03": ("metaspace", "<s>", "</s>", "list", "</s>", True, [TURNS, TURNS[:2]]),
    "gemma": ("metaspace", "<bos>", "<eos>", "config", "<end_of_turn>", True, [TURNS]),
    "chatml_generation": ("bytelevel", None, "<|im_end|>", "jinja", "<|im_end|>", True, [[SYSTEM, *TURNS]]),
    "builtin:chatml": ("bytelevel", None, "<|im_end|>", "config", "<|im_end|>", False, [[SYSTEM, *TURNS]]),
    "builtin:llama3": ("bytelevel", "<|begin_of_text|>", "<|eot_id|>", "config", "<|eot_id|>", True, [TURNS]),
}


def _runs(mask):
    """(start, end) of each run of 1s."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_ids_and_assistant_mask_match_transformers(tmp_path, name):
    kind, bos, eos, stored, end, trims, conversations = CASES[name]
    directory = _write_tokenizer(tmp_path / "tok", kind, bos, eos, _template(name), stored)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    template = load_chat_template(str(directory))
    assert template.source == _template(name)
    encoder = ChatEncoder(load_tokenizer(str(directory)), template)
    for messages in conversations:
        rendered = template.render(messages, variables=encoder.variables)
        assert rendered == hf.apply_chat_template(messages, tokenize=False)
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=template.has_generation_markers)  # fmt: skip
        ids, mask = encoder.encode({"messages": messages})
        assert ids == expected["input_ids"]
        assert len(mask) == len(ids)
        if template.has_generation_markers:
            assert mask == expected["assistant_masks"]
        # Each masked run is one assistant turn's content and its end-of-turn token, nothing else.
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        decoded = [hf.decode(ids[a:b]).strip() for a, b in _runs(mask)]
        assert decoded == [((r.strip() if trims else r) + end).strip() for r in replies]
        assert ids[_runs(mask)[-1][1] - 1] == hf.convert_tokens_to_ids(end)
        # Prompt + completion as strings is TRL's standard format: plain text even with a template, then EOS.
        prompt, completion = TURNS[0]["content"], " " + TURNS[1]["content"]
        ids, mask = encoder.encode({"prompt": prompt, "completion": completion})
        assert ids == hf(prompt + completion, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        assert hf.decode(ids[_runs(mask)[0][0]:]).strip() == (completion + hf.eos_token).strip()


def test_train_on_all_and_conversational_prompt_completion(tmp_path):
    directory = _write_tokenizer(tmp_path / "tok", "bytelevel", None, "<|im_end|>", _template("qwen2"), "config")
    tokenizer = load_tokenizer(str(directory))
    template = load_chat_template(str(directory))
    ids, mask = ChatEncoder(tokenizer, template, train_on_all=True).encode({"messages": TURNS})
    assert mask == [1] * len(ids) and ids == ChatEncoder(tokenizer, template).encode({"messages": TURNS})[0]
    # TRL's conversational prompt-completion: the prompt's assistant turn is context, not trained on.
    fields = ChatFields(prompt="question", completion="answer")
    record = {"question": [SYSTEM, *TURNS[:3]], "answer": TURNS[3:]}
    ids2, mask2 = ChatEncoder(tokenizer, template, fields=fields).encode(record)
    full_ids, full_mask = ChatEncoder(tokenizer, template).encode({"messages": [SYSTEM, *TURNS]})
    assert ids2 == full_ids
    assert len(_runs(full_mask)) == 2 and _runs(mask2) == _runs(full_mask)[1:]


def test_plain_text_and_prompt_completion_without_template(tmp_path):
    directory = _write_tokenizer(tmp_path / "tok", "bytelevel", None, "<|endoftext|>", "", "none")
    tokenizer = load_tokenizer(str(directory))
    encoder = ChatEncoder(tokenizer, None, fields=ChatFields(text="body"))
    ids, mask = encoder.encode({"body": "Four, of course."})
    assert ids == tokenizer.encode("Four, of course.") + [tokenizer.eos_id] and mask == [1] * len(ids)
    ids, mask = encoder.encode({"prompt": "What is 2+2?", "completion": " Four."})
    assert ids == tokenizer.encode("What is 2+2? Four.") + [tokenizer.eos_id]
    (a, b), = _runs(mask)
    assert b == len(ids) and tokenizer.decode(ids[a:b]) == " Four." and sum(mask[:a]) == 0
    record = {"prompt": "What is 2+2?", "completion": " Four."}
    everything = ChatEncoder(tokenizer, None, train_on_all=True).encode(record)
    assert everything == (ids, [1] * len(ids))


def test_sentencepiece_with_a_builtin_template():
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    template = load_chat_template("builtin:zephyr")
    assert template.missing_tokens(tokenizer.token_to_id) == []
    encoder = ChatEncoder(tokenizer, template)
    assert encoder.variables["eos_token"] == "</s>" and encoder.variables["bos_token"] == "<s>"
    messages = [SYSTEM, *TURNS]
    text = template.render(messages, variables=encoder.variables)
    assert text.startswith("<|system|>\nYou are terse.") and text.count("</s>") == 5
    ids, mask = encoder.encode({"messages": messages})
    assert ids.count(tokenizer.eos_id) == 5  # the template's `</s>` is the EOS id, not the text "</s>"
    assert tokenizer.decode(ids) == text.replace("</s>", "")
    # Each masked run covers exactly one reply and its `</s>` (read through the tokens' character spans).
    _, offsets = tokenizer.encode_with_offsets(text)
    runs = _runs(mask)
    assert [text[offsets[a][0] : offsets[b - 1][1]] for a, b in runs] == [m["content"] + "</s>" for m in TURNS[1::2]]
    assert all(ids[b - 1] == tokenizer.eos_id for a, b in runs)
    # Offsets: spans in characters (not UTF-8 bytes), contiguous; byte-fallback pieces share their character's
    # span; control pieces written in the text are their ids; no dummy prefix after a control piece.
    text = "héllo </s>\nworld 😀<s>"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert "".join(text[a:b] for a, b in dict.fromkeys(offsets)) == text
    assert ids[offsets.index((6, 10))] == tokenizer.eos_id and (ids[-1], offsets[-1]) == (tokenizer.bos_id, (18, 21))
    assert [text[a:b] for a, b in offsets].count("😀") == 4 and tokenizer.decode(ids) == "héllo \nworld 😀"
    assert ids[offsets.index((6, 10)) + 1] == tokenizer.encode("\n")[-1]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(JaxllmError, match=r"unknown chat template builtin:vicuna; the built-in templates are builtin:"):
        load_chat_template("builtin:vicuna")
    with pytest.raises(JaxllmError, match=r"chat template /no/such.jinja does not exist; expected a .jinja file"):
        load_chat_template("/no/such.jinja")
    with pytest.raises(JaxllmError, match="has no chat template"):
        load_chat_template(str(_write_tokenizer(tmp_path / "none", "bytelevel", None, "<|im_end|>", "", "none")))
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    encoder = ChatEncoder(tokenizer, ChatTemplate(_template("gemma"), "gemma.jinja"))
    errors = []
    for record in ({"conversation": TURNS}, {"messages": [SYSTEM, *TURNS]}, {"messages": [{"content": "x"}]},
                   {"prompt": "a", "completion": TURNS}):  # fmt: skip
        with pytest.raises(JaxllmError) as info:
            encoder.encode(record)
        errors.append(str(info.value))
    assert all("\n" not in e for e in errors)
    assert "none of the fields 'messages', 'prompt' + 'completion', 'text' (it has 'conversation')" in errors[0]
    assert errors[1] == "chat template gemma.jinja rejected the conversation: System role not supported"
    assert "each message needs a 'role'" in errors[2] and "both be strings or both lists" in errors[3]
    # Mistral v0.3 moves the system prompt into the last user turn: earlier turns change, no prefix spans.
    mistral = ChatEncoder(tokenizer, ChatTemplate(_template("mistral_v03"), "mistral_v03.jinja"))
    with pytest.raises(JaxllmError, match=r"mistral_v03.jinja does not render the conversation turn by turn.*gener"):
        mistral.encode({"messages": [SYSTEM, *TURNS]})
    assert sum(mistral.encode({"messages": TURNS})[1]) > 0  # without a system message it is turn by turn
    with pytest.raises(JaxllmError, match=r"chat template broken.jinja is not valid Jinja \(line 1: .*\)$"):
        ChatTemplate("{% for m in messages %}{{ m }}", "broken.jinja")
    config = {"chat_template": [{"name": "tool_use", "template": "x"}]}
    (tmp_path / "none" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(JaxllmError, match=r"lists chat templates \['tool_use'\] but none named 'default'"):
        load_chat_template(str(tmp_path / "none"))
    with pytest.raises(JaxllmError, match="messages format need a chat template"):
        ChatEncoder(tokenizer, None).encode({"messages": TURNS})


ENVIRONMENT_PROBE = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
  {{ m | tojson }} {{ dict(a=1) | tojson(indent=2) }}
  {%- if ns.n > 1 %}{% break %}{% endif %}
{% endfor %}
{{ bos_token ~ eos_token ~ (tools is none) ~ (documents is none) ~ strftime_now('%Y') ~ add_generation_prompt }}"""


def test_the_jinja_environment_renders_as_transformers_does(tmp_path):
    """trim/lstrip blocks, loop controls, namespace, dict, tojson without HTML escaping, the special-token,
    tools and documents variables, strftime_now; None values dropped and reasoning aliased as transformers does."""
    directory = _write_tokenizer(tmp_path / "tok", "bytelevel", "<s>", "</s>", ENVIRONMENT_PROBE, "config")
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    encoder = ChatEncoder(load_tokenizer(str(directory)), load_chat_template(str(directory)))
    messages = [SYSTEM, {"role": "user", "content": "<b>Grüße</b> & \"quotes\"", "reasoning": "hm", "name": None},
                *TURNS]
    for prompt in (False, True):
        ours = encoder.template.render(messages, prompt, encoder.variables)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert '"reasoning_content": "hm"' in ours and '"thinking": "hm"' in ours and '"name"' not in ours
    assert "<b>Grüße</b>" in ours and ours.endswith("<s></s>TrueTrue" + ours[-8:-4] + "True")
