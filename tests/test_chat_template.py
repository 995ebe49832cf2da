"""Chat templates: rendered in Jinja's sandbox as transformers renders them, assistant tokens found as
transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` finds them, with and without
``{% generation %}`` markers; the template chosen as transformers chooses it; bad templates refused.

The tokenizer folder is built offline: a byte-level BPE trained by the tokenizers library, saved by
transformers' ``PreTrainedTokenizerFast.save_pretrained`` (so it is a folder transformers itself wrote).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from moetrain.data.chat_template import ChatTemplate, find_chat_template
from moetrain.data.sample_encoding import span_mask
from moetrain.data.tokenizers import build_tokenizer
from moetrain.errors import UserError

transformers = pytest.importorskip("transformers")

# ChatML with generation markers around what the assistant writes (its content and end of turn).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
UNMARKED = re.sub(r"\{% (end)?generation %\}", "", CHATML)
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "Thank you"},
        {"role": "assistant", "content": "You are welcome, fine."},
    ],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " how are you, héllo €"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "y"},
     {"role": "assistant", "content": "thank you"}],
]  # fmt: skip


def save_tokenizer(folder, chat_template) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello there, how are you? I am fine, thank you. What is 2 + 2? It is 4."] * 50, trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", chat_template=chat_template
    )
    hf.save_pretrained(folder)


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatml")
    save_tokenizer(folder, CHATML)
    return folder


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_text_tokens_and_assistant_mask_equal_transformers(chatml_folder, messages):
    """The folder's own template (read from chat_template.jinja), rendered, tokenized and masked as
    transformers does it; the same template without its markers locates the same assistant tokens."""
    hf = transformers.AutoTokenizer.from_pretrained(chatml_folder)
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    template = find_chat_template(str(chatml_folder), None)
    assert template.origin.endswith("chat_template.jinja")
    assert template.variables == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    text, spans = template.assistant_spans(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    ids, offsets = build_tokenizer(str(chatml_folder)).encode_with_offsets(text)
    assert ids.tolist() == want["input_ids"]
    mask = span_mask(offsets, spans)
    assert mask.tolist() == want["assistant_masks"] and mask.sum() > 0
    unmarked_text, unmarked_spans = ChatTemplate(UNMARKED, "test").assistant_spans(messages)
    assert unmarked_text == text and span_mask(offsets, unmarked_spans).tolist() == want["assistant_masks"]


def test_generation_prompt_and_end_of_turn(chatml_folder):
    hf = transformers.AutoTokenizer.from_pretrained(chatml_folder)
    template = find_chat_template(str(chatml_folder), None)
    messages = [{"role": "user", "content": "Hi"}]
    assert template.render(messages, add_generation_prompt=True) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert template.render(messages, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert template.end_of_turn() == "<|im_end|>"
    assert ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", "t").end_of_turn() == ""


def test_named_templates_are_chosen_as_transformers_chooses(tmp_path):
    """tokenizer_config.json's list of named templates: 'default' unless data.chat_template names another;
    no default is an error listing the names; a name that is not there and no Jinja is an error."""
    save_tokenizer(tmp_path, None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "plain", "template": UNMARKED}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_chat_template(str(tmp_path), None).text == CHATML
    assert find_chat_template(str(tmp_path), "plain").text == UNMARKED
    assert find_chat_template(str(tmp_path), "{{ messages[0]['content'] }}").origin == "data.chat_template"
    with pytest.raises(UserError, match=r"neither a Jinja template nor the name.*'default', 'plain'"):
        find_chat_template(str(tmp_path), "tool_use")
    config["chat_template"] = [{"name": "plain", "template": UNMARKED}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"named chat templates \['plain'\] and no default"):
        find_chat_template(str(tmp_path), None)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert find_chat_template(str(tmp_path), "plain").text == hf.get_chat_template("plain")


def test_a_tokenizer_without_a_template_needs_one_in_the_config(tmp_path):
    with pytest.raises(UserError, match="tokenizer 'byte' has no chat template; set data.chat_template"):
        find_chat_template("byte", None)
    assert find_chat_template("byte", UNMARKED).text == UNMARKED


@pytest.mark.parametrize(
    "template, expect",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),  # the sandbox: no way to Python
        ("{{ messages.append(1) }}", "SecurityError"),  # immutable: a template cannot change the data
        ("{% set ns = namespace(_x=1) %}", "SecurityError"),
        ("{{ raise_exception('roles must alternate') }}", "TemplateError: roles must alternate"),
        ("{{ messages[0]['content'].nope() }}", "UndefinedError"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),  # the template's own code failing
    ],
)
def test_a_template_that_does_not_render_is_one_clear_error(template, expect):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(UserError) as err:
        ChatTemplate(template, "data.chat_template").assistant_spans(messages, "data file 'x.jsonl' line 3")
    assert str(err.value).startswith("data file 'x.jsonl' line 3: the chat template (data.chat_template) does not")
    assert expect in str(err.value)


def test_a_template_with_a_syntax_error_names_its_line():
    with pytest.raises(UserError, match=r"data.chat_template: the chat template is not valid Jinja \(line 2: "):
        ChatTemplate("ok\n{% for m in messages %}", "data.chat_template").render([])


def test_a_template_that_rewrites_earlier_turns_is_refused_without_markers():
    """Only the last assistant turn shown in full (like templates that drop past reasoning): rendering
    incrementally cannot locate the turns, and the message asks for generation markers."""
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}{% else %}..."
        "{% endif %}|{% endfor %}",
        "t",
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    with pytest.raises(UserError, match=r"does not render this conversation incrementally.*\{% generation %\}"):
        template.assistant_spans(messages, "here")


def test_span_mask_counts_every_token_that_overlaps_a_span():
    offsets = np.array([[0, 2], [2, 5], [5, 6], [6, 9], [9, 9]])
    assert span_mask(offsets, [(3, 6)]).tolist() == [0, 1, 1, 0, 0]
    assert span_mask(offsets, [(0, 1), (8, 10)]).tolist() == [1, 0, 0, 1, 1]  # an empty token inside: counted
