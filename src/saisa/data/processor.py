"""SaisaProcessor: text + images -> input_ids with ONE `<image>` token per image, attention_mask, pixel_values.

Unusual here: the placeholder is never expanded to v tokens (the model places visual tokens itself, see
model/naavit.py), so the processor only checks that placeholders and images agree, in reading order. Chat messages
use transformers' content parts (`{"type": "image", ...}`, `{"type": "text", ...}`) but are rendered by the
tokenizer's OWN chat template as plain strings with `<image>` where each image part was, so any text-only template
(ChatML, Llama-3, ...) works unchanged. Images are read with `saisa.data.images.load_image` (EXIF, alpha, 16-bit);
only local files are read unless `allow_remote=True`.

Read outputs with `processor.batch_decode(sequences[:, input_len:])` (special tokens skipped by default).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from saisa.data.images import ImageLoadError, load_image
from saisa.data.templates import IMAGE_TOKEN, image_token_id

REMOTE_PREFIXES = ("http://", "https://")


class RemoteImageError(ValueError):
    """An image part names a URL while remote images are off (or the download failed)."""


def _fetch(url: str, timeout: float = 20.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as e:
        raise RemoteImageError(f"could not download image {url}: {e}") from None


class SaisaProcessor(ProcessorMixin):
    """A tokenizer (with `<image>` as a special token) and the vision tower's image processor, saved side by side.

    `SaisaProcessor(image_processor, tokenizer)`; `saisa.data.processor.load_processor(folder)` also builds one for a
    model folder that holds only a tokenizer.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_token: str = IMAGE_TOKEN, **kwargs) -> None:
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, **kwargs)
        self.image_token_id = image_token_id(tokenizer, image_token)  # raises unless it is exactly one token

    # ------------------------------------------------------------------ images
    def load_images(self, images: Any, allow_remote: bool = False) -> list[Image.Image]:
        """PIL images from PIL images, paths, bytes or URLs (URLs only with allow_remote=True)."""
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for img in images:
            if isinstance(img, (list, tuple)):  # nested: one list per sample
                out += self.load_images(img, allow_remote)
                continue
            if isinstance(img, str) and img.startswith(REMOTE_PREFIXES):
                if not allow_remote:
                    raise RemoteImageError(f"remote image {img} refused: download it and pass a local path, or "
                                           "pass allow_remote=True")
                img = _fetch(img)
            out.append(load_image(img))
        return out

    def pixel_values(self, images: Sequence[Image.Image]):
        """(N, C, H, W) float pixels for the vision tower."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    # ------------------------------------------------------------------ text + images
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        *,
        padding_side: str = "left",
        add_special_tokens: bool = True,
        return_tensors: str = "pt",
        allow_remote: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` (one string or a batch; `<image>` marks each image) and preprocess `images`.

        Images are given in reading order across the batch (a flat list, or one list per sample). Batches are padded
        on `padding_side` ("left" for generation). Returns input_ids (B, L), attention_mask (B, L) and, with images,
        pixel_values (N, C, H, W).
        """
        if text is None:
            raise ValueError("SaisaProcessor needs text= (put one <image> in it for each image)")
        texts = [text] if isinstance(text, str) else list(text)
        loaded = self.load_images(images, allow_remote)
        found = sum(t.count(self.image_token) for t in texts)
        if found != len(loaded):
            raise ValueError(f"the text holds {found} {self.image_token!r} placeholder(s) but {len(loaded)} image(s) "
                             f"were given; put one {self.image_token} in the text for each image, in order")
        if len(texts) > 1 and self.tokenizer.pad_token is None:
            raise ValueError("the tokenizer has no pad token, which a batch needs; set tokenizer.pad_token "
                             "(e.g. to its eos token)")
        enc = self.tokenizer(texts, padding=len(texts) > 1, padding_side=padding_side,
                             add_special_tokens=add_special_tokens, return_tensors=return_tensors, **kwargs)
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if loaded:
            data["pixel_values"] = self.pixel_values(loaded)
        return BatchFeature(data=data)

    # ------------------------------------------------------------------ chat
    def _content(self, content: Any, allow_remote: bool) -> tuple[str, list[Image.Image]]:
        if isinstance(content, str):
            return content, []
        pieces, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                pieces.append(part["text"])
            elif kind == "image":
                source = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                if source is None:
                    raise ValueError(f"image part {dict(part)} has none of 'image' (PIL or path), 'path', 'url'")
                if isinstance(source, os.PathLike):
                    source = os.fspath(source)
                images += self.load_images([source], allow_remote)
                pieces.append(self.image_token)
            else:
                raise ValueError(f"unknown content part {part!r}; use {{'type': 'text', 'text': ...}} or "
                                 "{'type': 'image', 'image' | 'path' | 'url': ...}")
        return "\n".join(pieces), images

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, allow_remote: bool = False
    ) -> tuple[str, list[Image.Image]]:
        """The conversation as the tokenizer's chat template renders it (each image part -> `<image>`, parts joined
        by newlines), and its images in order."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; set tokenizer.chat_template or call the processor "
                             "on plain text")
        flat, images = [], []
        for m in messages:
            text, imgs = self._content(m.get("content", ""), allow_remote)
            flat.append({"role": m["role"], "content": text})
            images += imgs
        rendered = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        return rendered, images

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str = "pt",
        allow_remote: bool = False,
        **kwargs,
    ):
        """Render one conversation (or a batch of them) and, with tokenize=True, return model inputs.

        messages: `[{"role": "user", "content": [{"type": "image", "image": PIL | "path": str}, {"type": "text",
        "text": "..."}]}, ...]` (content may also be a plain string). tokenize=False returns the rendered string(s);
        return_dict=False returns input_ids only. The template writes BOS itself, so no special tokens are added.
        """
        batch = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = list(messages) if batch else [messages]
        rendered = [self.render(c, add_generation_prompt, allow_remote) for c in conversations]
        texts = [t for t, _ in rendered]
        if not tokenize:
            return texts if batch else texts[0]
        images = [img for _, imgs in rendered for img in imgs]
        out = self(text=texts, images=images or None, add_special_tokens=False, return_tensors=return_tensors,
                   **kwargs)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ outputs
    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Texts of generated ids; pass `sequences[:, input_ids.shape[1]:]` to drop the prompt."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def load_processor(path: str | os.PathLike, config=None) -> SaisaProcessor:
    """The processor saved in a model folder, or one built from the folder's tokenizer and the vision config's
    image processor (`config`: the model's SaisaConfig; read from the folder when None)."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "processor_config.json")):
        return SaisaProcessor.from_pretrained(path)
    from saisa.model.vision import image_processor_for

    if config is None:
        from saisa import SaisaConfig

        config = SaisaConfig.from_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} holds no processor and no tokenizer ({e}); save one there with "
                         "SaisaProcessor.save_pretrained(path)") from None
    return SaisaProcessor(image_processor_for(config.vision_config), tokenizer)


__all__ = ["ImageLoadError", "RemoteImageError", "SaisaProcessor", "load_processor"]
