"""Offline tokenizers and small image helpers for the data tests (no model hub).

Two tiny tokenizers trained in milliseconds with `tokenizers`: a byte-level BPE (GPT-2/SmolLM2 style, merges across
words happen) and a Metaspace BPE with `prepend_scheme="first"` (Llama/Vicuna SentencePiece style, where a piece
tokenized on its own gets a spurious leading "▁"). Both add BOS "<s>" like Llama, hold the chat special tokens and
`<image>`, and carry a ChatML `chat_template`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from saisa.data.templates import ensure_image_token

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|end_of_text|>"]

CHATML = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions.",
    "USER: What colour is the circle? ASSISTANT: Red. USER: How many shapes are there? ASSISTANT: Two.",
    "system user assistant You are a helpful language and vision assistant. Hello world.",
    "There are three shapes: a large red circle in the top left, a small blue square in the center.",
    "Answer the question using a single word or phrase. Describe the image briefly.",
]


@functools.cache
def _build(kind: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS)) | set("▁\n0123456789?!.,:;'\"-_<>|/abcdefghijklmnopqrstuvwxyz"
                                                       "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def make_tokenizer(kind: str = "bytelevel", *, image_token: bool = True) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of `kind` ("bytelevel" or "metaspace"); `<image>` added unless image_token=False."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_build(kind).from_str(_build(kind).to_str()), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHATML
    if image_token:
        ensure_image_token(tok)
    return tok


def supervised_spans(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    spans, run = [], []
    for t, lab in zip(list(input_ids), list(labels)):
        if int(lab) != -100:
            assert int(lab) == int(t), "a supervised label must equal its input token"
            run.append(int(t))
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in spans]


def solid(colour, size=(8, 6), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


class MeanColourProcessor:
    """A stand-in image processor: each image -> a (3, 2, 2) tensor filled with its mean RGB / 255."""

    image_mean = (0.5, 0.5, 0.5)

    def __call__(self, images, return_tensors="pt"):
        rows = []
        for img in images:
            px = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).mean((0, 1)) / 255  # (3,)
            rows.append(px.view(3, 1, 1).expand(3, 2, 2))
        return {"pixel_values": torch.stack(rows)}  # (N, 3, 2, 2)


def test_helpers_tokenizers_behave_like_their_models():
    bpe, sp = make_tokenizer("bytelevel"), make_tokenizer("metaspace")
    for tok in (bpe, sp):
        ids = tok("Hello world")["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert len(tok("<image>", add_special_tokens=False)["input_ids"]) == 1
        assert len(tok("<|eot_id|>", add_special_tokens=False)["input_ids"]) == 1
    # the SentencePiece-style one adds a prefix "▁" to a piece tokenized alone: naive per-piece tokenization breaks
    alone = sp("USER:", add_special_tokens=False)["input_ids"]
    inside = sp("Red.</s>USER:", add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(alone)[0].startswith("▁")
    assert alone != inside[-len(alone):]
