"""Conversation templates and label masking: which tokens of a chat carry the loss.

Unusual here: labels are never found by searching the rendered string or by counting the tokens of pieces tokenized
on their own (LLaVA's way, whose "tokenization mismatch" silently zeroes the loss of a whole sample when a BPE merge
or a SentencePiece prefix space shifts a count). A template renders a conversation as ordered segments, each marked
supervised or not; the encoder tokenizes every *cumulative* prefix of the rendering and takes each segment's tokens as
the difference between successive prefixes. It checks that each prefix's tokens are a prefix of the next (so the
pieces concatenate to exactly the full rendering's tokens) and fails with the sample id when they are not. The
`chat_template` template gets its segments the same way from the tokenizer's jinja template, rendered for 1, 2, ...
messages.

Templates (LLaVA `llava/conversation.py`, LLaVA-NeXT, SAISA's fork):
    plain          stage 1: the user turn is replaced by its `<image>` placeholders; loss on caption + "\\n".
    vicuna_v1      LLaVA-1.5 `v1`: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."; loss on " {a}</s>".
    llava_v1       as vicuna_v1 with LLaVA's `conv_llava_v1` system prompt ("curious human ... human's questions").
    llama_3        LLaVA-NeXT's Llama-3 header format; loss on "{a}<|eot_id|>" (headers masked).
    saisa_llama_3  SAISA's own `llama_3`: vicuna_v1 layout closed by "<|end_of_text|>".
    chat_template  the tokenizer's own jinja chat template (e.g. SmolLM2's ChatML); loss on what an assistant message
                   adds after the generation prompt, i.e. "{a}<|im_end|>\\n" for ChatML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"

# LLaVA data says human/gpt; chat templates say user/assistant.
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

VICUNA_SYSTEM = (  # LLaVA `conv_vicuna_v1`, the template LLaVA-1.5 and SAISA train and evaluate with (`--version v1`)
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (  # LLaVA `conv_llava_v1`
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_3_SYSTEM = (  # LLaVA-NeXT `conv_llava_llama_3`
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


class TemplateError(ValueError):
    """A conversation cannot be rendered or tokenized consistently (names the sample and what to do)."""


class FullyMaskedError(ValueError):
    """Every label of a sample is -100 (nothing to learn): counted and skipped, never trained on as zero loss."""

    def __init__(self, message: str, sample_id: Any = None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True: these tokens carry the loss


@dataclass(frozen=True, kw_only=True)
class Encoded:
    input_ids: list[int]  # (L,) after truncation; one image token per image
    labels: list[int]  # (L,) IGNORE_INDEX outside assistant turns
    num_images: int  # image placeholders left after truncation (images past them must be dropped)
    num_tokens: int  # length before truncation

    @property
    def truncated(self) -> bool:
        return self.num_tokens > len(self.input_ids)


# --------------------------------------------------------------------------------------------------------------------
# messages


def _sample(sample_id: Any) -> str:
    return f"sample {sample_id!r}" if sample_id is not None else "conversation"


def to_messages(conversations: Sequence[Mapping[str, Any]], sample_id: Any = None) -> list[dict[str, str]]:
    """LLaVA turns `{"from": "human"|"gpt", "value"}` (or `{"role", "content"}`) -> `[{"role", "content"}]`."""
    messages = []
    for k, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise TemplateError(
                f"{_sample(sample_id)}: turn {k} has role {role!r}; expected one of {sorted(ROLE_ALIASES)} "
                "in the 'from' (LLaVA) or 'role' field"
            )
        if not isinstance(content, str):
            raise TemplateError(
                f"{_sample(sample_id)}: turn {k} has a {type(content).__name__} value; expected a string "
                "(images are named by '<image>' in the text and listed in the sample's 'image' field)"
            )
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    return messages


def _split_system(messages: list[dict[str, str]], default: str) -> tuple[str, list[dict[str, str]]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


# --------------------------------------------------------------------------------------------------------------------
# templates


class Template:
    """Renders messages as segments; subclasses define the layout."""

    name: str = ""
    use_tokenizer_bos: bool = True  # prepend what `tokenizer(text)` puts before the text (BOS for Llama tokenizers)
    required_tokens: tuple[str, ...] = ()  # strings that must be ONE token of the tokenizer

    def segments(self, messages: list[dict[str, str]], tokenizer: Any, *, add_generation_prompt: bool = False
                 ) -> list[Segment]:
        raise NotImplementedError

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """Strings that end an assistant turn (for generation)."""
        return []

    def check_tokenizer(self, tokenizer: Any) -> None:
        for text in self.resolved_required_tokens(tokenizer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise TemplateError(
                    f"template {self.name!r} needs {text!r} to be a single token, but this tokenizer splits it into "
                    f"{len(ids)} tokens; use a tokenizer that has it (or add it as a special token), or use "
                    "template 'chat_template'"
                )

    def resolved_required_tokens(self, tokenizer: Any) -> tuple[str, ...]:
        return self.required_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class PlainTemplate(Template):
    """LLaVA `conv_llava_plain` + `preprocess_plain`: "<image>" + caption + "\\n", user text dropped."""

    name = "plain"

    def __init__(self, sep: str = "\n") -> None:
        self.sep = sep

    def segments(self, messages, tokenizer, *, add_generation_prompt=False):
        out = []
        for m in messages:
            if m["role"] == "user":
                out.append(Segment(IMAGE_TOKEN * m["content"].count(IMAGE_TOKEN), False))
            elif m["role"] == "assistant":
                out.append(Segment(m["content"] + self.sep, True))
        return out

    def stop_strings(self, tokenizer):
        return [self.sep]


class SeparatorTemplate(Template):
    """LLaVA `SeparatorStyle.TWO`: "{system}{sep}USER: {q}{sep}ASSISTANT: {a}{sep2}USER: ...".

    The space after "ASSISTANT:" belongs to the answer segment, where BPE and SentencePiece both attach it to the
    answer's first word (LLaVA's `instruction_len - 2` does the same).
    """

    def __init__(self, name: str, system: str, *, roles: tuple[str, str] = ("USER", "ASSISTANT"), sep: str = " ",
                 sep2: str | None = None) -> None:
        self.name, self.system, self.roles, self.sep = name, system, roles, sep
        self._sep2 = sep2  # None: the tokenizer's EOS ("</s>" for Vicuna, which LLaVA hard-codes)

    def sep2(self, tokenizer: Any) -> str:
        if self._sep2 is not None:
            return self._sep2
        if tokenizer.eos_token is None:
            raise TemplateError(f"template {self.name!r} closes assistant turns with the EOS token, but the "
                                "tokenizer has no eos_token; set one")
        return tokenizer.eos_token

    def resolved_required_tokens(self, tokenizer):
        return (self.sep2(tokenizer),)

    def segments(self, messages, tokenizer, *, add_generation_prompt=False):
        system, messages = _split_system(messages, self.system)
        user, assistant = self.roles
        out = [Segment(system + self.sep, False)]
        for m in messages:
            if m["role"] == "user":
                out.append(Segment(f"{user}: {m['content']}{self.sep}", False))
            elif m["role"] == "assistant":
                out.append(Segment(f"{assistant}:", False))
                out.append(Segment(f" {m['content']}{self.sep2(tokenizer)}", True))
            else:
                raise TemplateError(f"template {self.name!r}: a system message may only come first")
        if add_generation_prompt:
            out.append(Segment(f"{assistant}:", False))
        return out

    def stop_strings(self, tokenizer):
        return [self.sep2(tokenizer)]


class Llama3Template(Template):
    """LLaVA-NeXT `conv_llava_llama_3` (Meta's Llama-3 chat format; contents are trimmed as Meta's template does)."""

    name = "llama_3"
    required_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, system: str = LLAMA_3_SYSTEM) -> None:
        self.system = system

    @staticmethod
    def _header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def segments(self, messages, tokenizer, *, add_generation_prompt=False):
        system, messages = _split_system(messages, self.system)
        out = [Segment(self._header("system") + system.strip() + "<|eot_id|>", False)]
        for m in messages:
            if m["role"] == "assistant":
                out.append(Segment(self._header("assistant"), False))
                out.append(Segment(m["content"].strip() + "<|eot_id|>", True))
            elif m["role"] == "user":
                out.append(Segment(self._header("user") + m["content"].strip() + "<|eot_id|>", False))
            else:
                raise TemplateError(f"template {self.name!r}: a system message may only come first")
        if add_generation_prompt:
            out.append(Segment(self._header("assistant"), False))
        return out

    def stop_strings(self, tokenizer):
        return ["<|eot_id|>"]


class ChatTemplate(Template):
    """The tokenizer's jinja `chat_template`, split into segments by rendering 1, 2, ... messages.

    A user/system message's segment is what rendering it adds; an assistant message's is what it adds after the
    generation prompt. Templates that rewrite earlier turns when more follow (Qwen3 drops old reasoning) break the
    prefix property and are refused.
    """

    name = "chat_template"
    use_tokenizer_bos = False  # the jinja template writes BOS itself when the model wants one

    def check_tokenizer(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat_template' needs tokenizer.chat_template, and this tokenizer has none; "
                                "set one or pick a named template (vicuna_v1, llama_3, plain)")

    @staticmethod
    def _render(tokenizer, messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, messages, tokenizer, *, add_generation_prompt=False):
        out, prev = [], ""

        def extend(text: str, train: bool, what: str) -> None:
            nonlocal prev
            if not text.startswith(prev):
                raise TemplateError(
                    f"the chat template renders the first messages differently once {what} is added, so turns "
                    f"cannot be masked one by one (before: ...{prev[-60:]!r}; "
                    f"after: ...{text[max(0, len(prev) - 60):]!r}); "
                    "use a template that renders earlier turns unchanged, or a named template"
                )
            out.append(Segment(text[len(prev):], train))
            prev = text

        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                if i == 0:
                    raise TemplateError("the conversation starts with an assistant turn; chat templates need a "
                                        "user (or system) message first")
                extend(self._render(tokenizer, messages[:i], True), False, f"the generation prompt after message {i}")
            extend(self._render(tokenizer, messages[: i + 1], False), m["role"] == "assistant", f"message {i + 1}")
        if add_generation_prompt:
            extend(self._render(tokenizer, messages, True), False, "the generation prompt")
        return out

    def stop_strings(self, tokenizer):
        return [tokenizer.eos_token] if tokenizer.eos_token else []


TEMPLATES: dict[str, Template] = {
    "plain": PlainTemplate(),
    "vicuna_v1": SeparatorTemplate("vicuna_v1", VICUNA_SYSTEM),
    "llava_v1": SeparatorTemplate("llava_v1", LLAVA_V1_SYSTEM),
    "llama_3": Llama3Template(),
    "saisa_llama_3": SeparatorTemplate("saisa_llama_3", VICUNA_SYSTEM, sep2="<|end_of_text|>"),
    "chat_template": ChatTemplate(),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise KeyError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


# --------------------------------------------------------------------------------------------------------------------
# tokenizer helpers


def ensure_image_token(tokenizer: Any, image_token: str = IMAGE_TOKEN) -> int:
    """Add `image_token` as a special token if missing (the model's embeddings must then be resized); return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return image_token_id(tokenizer, image_token)


def image_token_id(tokenizer: Any, image_token: str = IMAGE_TOKEN) -> int:
    """Id of the image placeholder; raises if it is not exactly one token."""
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TemplateError(
            f"{image_token!r} tokenizes as {len(ids)} tokens; add it as a special token first "
            f"(saisa.data.templates.ensure_image_token(tokenizer)) so each image is one placeholder"
        )
    return ids[0]


def leading_special_ids(tokenizer: Any) -> list[int]:
    """Ids `tokenizer(text)` puts before the text ([BOS] for Llama/Vicuna, [] for SmolLM2); trailing ones dropped."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k: k + len(plain)] == plain:
            return list(full[:k])
    return []


# --------------------------------------------------------------------------------------------------------------------
# encoding


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if merged and merged[-1].train == s.train:
            merged[-1] = Segment(merged[-1].text + s.text, s.train)
        else:
            merged.append(s)
    return merged


def _tokenize_segments(segments: list[Segment], tokenizer: Any, template: Template, sample_id: Any
                       ) -> tuple[list[int], list[int]]:
    """Token ids and labels of the segments, by differencing the tokenization of cumulative prefixes."""
    prefixes, text = [], ""
    for s in segments:
        text += s.text
        prefixes.append(text)
    tokenized = tokenizer(prefixes, add_special_tokens=False)["input_ids"] if prefixes else []
    lead = leading_special_ids(tokenizer) if template.use_tokenizer_bos else []
    input_ids, labels, prev = list(lead), [IGNORE_INDEX] * len(lead), []
    for k, (seg, ids) in enumerate(zip(segments, tokenized)):
        if ids[: len(prev)] != prev:
            raise TemplateError(
                f"{_sample(sample_id)}: tokenization mismatch with template {template.name!r}: the tokens of the text "
                f"before segment {k} ({prefixes[k - 1][-40:]!r}) change once {seg.text[:40]!r} follows, so the pieces "
                "would not add up to the full conversation's tokens; the boundary merges into one token. Check the "
                "template's separators against this tokenizer, or use template 'chat_template'"
            )
        new = list(ids[len(prev):])
        input_ids += new
        labels += new if seg.train else [IGNORE_INDEX] * len(new)
        prev = ids
    if tokenized and input_ids[len(lead):] != list(tokenized[-1]):  # by construction; kept as the explicit check
        raise TemplateError(f"{_sample(sample_id)}: segment tokens differ from the full conversation's tokens")
    return input_ids, labels


def _encode(messages, tokenizer, template, *, sample_id, image_token, add_generation_prompt):
    template = get_template(template)
    template.check_tokenizer(tokenizer)
    try:
        segments = _merge(template.segments(messages, tokenizer, add_generation_prompt=add_generation_prompt))
    except TemplateError as e:
        raise TemplateError(f"{_sample(sample_id)}: {e}") from None
    except Exception as e:  # jinja errors (e.g. a template that insists on alternating roles)
        raise TemplateError(f"{_sample(sample_id)}: template {template.name!r} failed to render: {e}") from e
    input_ids, labels = _tokenize_segments(segments, tokenizer, template, sample_id)
    expected = sum(s.text.count(image_token) for s in segments)
    img_id = image_token_id(tokenizer, image_token) if expected else None
    found = sum(1 for t in input_ids if t == img_id) if expected else 0
    if found != expected:
        raise TemplateError(f"{_sample(sample_id)}: {expected} {image_token!r} in the text but {found} image tokens "
                            "after tokenization; each must be one special token (ensure_image_token)")
    if img_id is not None:
        labels = [IGNORE_INDEX if t == img_id else lab for t, lab in zip(input_ids, labels)]
    return input_ids, labels, img_id


def encode_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, template: str | Template, *,
                        max_length: int | None = None, sample_id: Any = None, image_token: str = IMAGE_TOKEN
                        ) -> Encoded:
    """Tokenize a conversation for training: ids and labels with loss on assistant turns only.

    `messages` are `{"role", "content"}` dicts (or LLaVA `{"from", "value"}` turns). Truncates to `max_length` from
    the right. Raises `FullyMaskedError` when no label is left (nothing to learn: the caller counts and skips it),
    `TemplateError` when the pieces do not tokenize consistently.
    """
    messages = to_messages(messages, sample_id)
    input_ids, labels, img_id = _encode(messages, tokenizer, template, sample_id=sample_id, image_token=image_token,
                                        add_generation_prompt=False)
    num_tokens = len(input_ids)
    if max_length is not None and num_tokens > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        why = (f"after truncation from {num_tokens} to max_length={max_length} tokens" if num_tokens > len(input_ids)
               else "it has no assistant turn")
        raise FullyMaskedError(f"{_sample(sample_id)}: every label is masked ({why}); nothing to learn", sample_id)
    num_images = sum(1 for t in input_ids if t == img_id) if img_id is not None else 0
    return Encoded(input_ids=input_ids, labels=labels, num_images=num_images, num_tokens=num_tokens)


def encode_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Any, template: str | Template, *,
                  image_token: str = IMAGE_TOKEN) -> list[int]:
    """Token ids of a conversation followed by the assistant's generation prompt (for inference)."""
    messages = to_messages(messages)
    input_ids, _, _ = _encode(messages, tokenizer, template, sample_id=None, image_token=image_token,
                              add_generation_prompt=True)
    return input_ids
