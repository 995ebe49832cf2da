"""Chat templates: which one (``data.chat_template`` or the tokenizer's), rendered in Jinja's sandbox, and
where the assistant's text is in what they render.

Where the template comes from, as transformers' ``get_chat_template`` chooses it:

- the tokenizer's: ``chat_template.jinja`` (and ``additional_chat_templates/NAME.jinja``) or the
  ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of ``{name, template}``) beside the
  ``tokenizer.json`` that ``data.tokenizer`` names, or a hub tokenizer's ``chat_template``;
- ``data.chat_template``: the name of one of the tokenizer's named templates, or a template itself.

The byte tokenizer and a trained BPE have none: ``data.chat_template`` gives it.

Rendering: ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with the globals and filters transformers
gives templates (``raise_exception``, ``strftime_now``, ``tojson``, loop controls, ``{% generation %}``),
and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables, so a template renders
here exactly what ``apply_chat_template`` renders, and a template read from disk cannot run code.

Assistant spans (the characters the loss counts):

- a template with ``{% generation %} ... {% endgeneration %}`` marks them itself (transformers'
  ``return_assistant_tokens_mask``);
- otherwise incrementally: assistant message i spans from the end of ``render(messages[:i],
  add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])`` -- its content and whatever the
  template closes the turn with (an end-of-turn token, a line break). Each rendering must be a prefix of the
  next one; a template that rewrites earlier turns (drops past reasoning, say) is refused with a message
  asking for generation markers.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moetrain.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = "\ue000probe\ue001"  # an assistant content no real message holds (private-use characters)


@dataclass(frozen=True)
class ChatTemplate:
    """A template and the variables it is rendered with; plain strings, so it travels to tokenizer workers."""

    text: str
    origin: str  # where it came from, for messages: "data.chat_template" or a file
    variables: dict[str, str] = field(default_factory=dict)  # the tokenizer's special tokens

    @property
    def identity(self) -> str:
        """What the rendered tokens depend on (for the store's fingerprint)."""
        return hashlib.sha256(json.dumps([self.text, sorted(self.variables.items())]).encode()).hexdigest()[:20]

    @property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION_TAG.search(self.text))

    def render(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
        text, _ = self._render(messages, add_generation_prompt, where, track=False)
        return text

    def assistant_spans(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span ``[start, end)`` of each assistant turn, in order."""
        if self.has_generation_markers:
            return self._render(messages, False, where, track=True)
        last = len(messages) - 1
        full = None if messages[last]["role"] == "assistant" else self.render(messages, where=where)
        spans = []
        for i in (i for i in range(last, -1, -1) if messages[i]["role"] == "assistant"):  # the last one first
            before = self.render(messages[:i], add_generation_prompt=True, where=where)
            upto = self.render(messages[: i + 1], where=where)
            full = upto if full is None else full  # a conversation that ends with the assistant: the same text
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UserError(
                    f"{where}: the chat template ({self.origin}) does not render this conversation incrementally "
                    f"(rendering messages[:{i}] with the generation prompt is not a prefix of rendering "
                    f"messages[:{i + 1}], or that of rendering them all), so the assistant turns cannot be located; "
                    "mark them in the template with {% generation %}...{% endgeneration %}"
                )
            spans.append((len(before), len(upto)))
        return full, spans[::-1]

    def end_of_turn(self) -> str:
        """What the template writes after an assistant message's content (stripped of white space), e.g.
        ``<|im_end|>``: where ``generate --chat`` stops. Empty when it writes nothing."""
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}], where="probe")
        at = text.find(PROBE)
        return text[at + len(PROBE) :].strip() if at >= 0 else ""

    def _render(
        self, messages: list[dict], add_generation_prompt: bool, where: str, track: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        compiled = _compile(self.text, self.origin)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            with compiled.environment.tracking(blocks if track else None, spans):
                for block in compiled.generate(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.variables,
                ):
                    blocks.append(block)
        except Exception as exc:  # noqa: BLE001 - a template is input: TemplateError, or TypeError from its own code
            raise UserError(
                f"{where}: the chat template ({self.origin}) does not render it: {type(exc).__name__}: {exc}; "
                "fix the record or the template"
            ) from None
        return "".join(blocks), spans


@lru_cache(maxsize=8)
def _compile(text: str, origin: str):
    """The template compiled in the sandbox with what transformers gives templates (its
    ``_cached_compile_jinja_template``)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(
            f"{origin}: the chat template is not valid Jinja (line {exc.lineno}: {exc.message}); fix the template"
        ) from None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # as transformers: no HTML escaping, its options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys`` only: no attribute of the real type reachable (transformers' hardening)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names (no way to CPython internals; transformers' hardening)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace signature trick
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


class _GenerationTracker(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: records the character span of what the block renders,
    counted over the blocks the template has yielded so far (transformers' ``AssistantTracker``)."""

    tags = {"generation"}

    def __init__(self, environment) -> None:
        super().__init__(environment)
        environment.extend(tracking=self.tracking)
        self._state: ContextVar = ContextVar("moetrain_generation_tracker", default=None)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        out = caller()
        state = self._state.get()
        if state is not None and state[0] is not None:
            blocks, spans = state
            start = len("".join(blocks))
            spans.append((start, start + len(out)))
        return out

    @contextmanager
    def tracking(self, blocks: list[str] | None, spans: list[tuple[int, int]]):
        token = self._state.set((blocks, spans))
        try:
            yield
        finally:
            self._state.reset(token)


# --- which template --------------------------------------------------------------------------------------


def find_chat_template(tokenizer: str, chat_template: str | None) -> ChatTemplate:
    """The template for ``data.tokenizer`` (a string: 'byte', a tokenizer.json or its folder, a hub name, or
    a trained BPE's file) and ``data.chat_template``; UserError when there is none."""
    own, variables, where = _tokenizer_templates(tokenizer)
    if isinstance(own, dict):
        if chat_template is not None and chat_template in own:
            return ChatTemplate(own[chat_template], f"{where}, template {chat_template!r}", variables)
        if chat_template is None:
            if "default" not in own:
                raise UserError(
                    f"data.chat_template: the tokenizer ({where}) has the named chat templates {sorted(own)} and no "
                    "default; set data.chat_template to one of the names"
                )
            return ChatTemplate(own["default"], f"{where}, template 'default'", variables)
    elif chat_template is None and own is not None:
        return ChatTemplate(own, where, variables)
    if chat_template is None:
        raise UserError(
            f"data.chat_template: the tokenizer {tokenizer!r} has no chat template; set data.chat_template to a Jinja "
            "chat template (docs/data.md, 'Chat and prompt-completion data')"
        )
    if "{" not in chat_template:
        names = f" (its templates: {sorted(own)})" if isinstance(own, dict) else ""
        raise UserError(
            f"data.chat_template: {chat_template!r} is neither a Jinja template nor the name of one of the "
            f"tokenizer's templates{names}"
        )
    return ChatTemplate(chat_template, "data.chat_template", variables)


def _tokenizer_templates(tokenizer: str) -> tuple[str | dict[str, str] | None, dict[str, str], str]:
    """The tokenizer's own template(s), its special tokens as template variables, and where they are."""
    from moetrain.data.tokenizers import tokenizer_file

    if tokenizer == "byte":
        return None, {}, "byte"
    path = tokenizer_file(tokenizer)
    if path is None:  # a hub name, through transformers
        from moetrain.data.tokenizers import HFTokenizer

        tok = HFTokenizer(tokenizer).tok
        own = tok.chat_template
        return own, {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}, repr(tokenizer)
    return folder_templates(path.parent)


def folder_templates(folder: Path) -> tuple[str | dict[str, str] | None, dict[str, str], str]:
    """A tokenizer folder's template(s) (as transformers reads them), its special tokens, and where."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    variables = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken written as an object
            value = value.get("content")
        if isinstance(value, str):
            variables[key] = value
    templates: dict[str, str] = {}
    if (folder / TEMPLATE_FILE).is_file():
        templates["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / TEMPLATE_DIR).is_dir():
        for f in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if templates:
        where = str(folder / TEMPLATE_FILE) if "default" in templates else str(folder / TEMPLATE_DIR)
        own = templates["default"] if list(templates) == ["default"] else templates
        return own, variables, where
    listed = config.get("chat_template")
    if isinstance(listed, list):
        return {t["name"]: t["template"] for t in listed}, variables, str(config_file)
    return (listed if isinstance(listed, str) else None), variables, str(config_file)


def data_chat_template(tokenizer, chat_template: str | None) -> ChatTemplate:
    """The template of a data config: ``data.tokenizer`` (a string, or a trained BPE's spec, which has no
    template of its own but whose ``<|endoftext|>`` is its ``eos_token``) and ``data.chat_template``."""
    if isinstance(tokenizer, str):
        return find_chat_template(tokenizer, chat_template)
    if chat_template is None:
        raise UserError(
            "data.chat_template: a trained BPE (data.tokenizer: {train: bpe, ...}) has no chat template; set "
            "data.chat_template to a Jinja chat template (docs/data.md, 'Chat and prompt-completion data')"
        )
    return ChatTemplate(chat_template, "data.chat_template", {"eos_token": "<|endoftext|>"})
