"""LLaVA-format conversation data (a JSON file + an image folder, or an HF `datasets.Dataset`) as a torch Dataset.

Unusual here: a sample is tokenized before its images are opened, so images whose `<image>` placeholder was cut by
truncation are never decoded (and are dropped, keeping placeholders and images in step). A sample with no supervised
token left is returned as a counted skip (`{"id", "skipped": reason}`) that the collator drops and logs; it is never
trained on as a silent zero loss. `lengths` / `is_multimodal` for length-grouped sampling come from the text alone
(word counts, as LLaVA does), without touching an image or the tokenizer.

Records: `{"id", "image": path | [paths] | PIL | HF image dict (optional), "conversations": [{"from": "human"|"gpt",
"value"}]}`; `<image>` marks where each image goes, in order. `datasets` is not imported here: any indexable of such
mappings works, HF datasets included.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from saisa.data.images import ImageLoadError, background_for, expand_to_square, load_image
from saisa.data.templates import (
    IMAGE_TOKEN,
    FullyMaskedError,
    Template,
    encode_conversation,
    get_template,
    to_messages,
)

logger = logging.getLogger(__name__)

ASPECT_RATIOS = ("pad", "square")


class ImageCountError(ValueError):
    """The number of `<image>` placeholders in a sample's text differs from the number of its images."""


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A LLaVA JSON list (`.json`) or one JSON object per line (`.jsonl`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got a {type(records).__name__}")
    return records


def sample_id(record: Mapping[str, Any], index: int) -> Any:
    return record.get("id", index)


def image_sources(record: Mapping[str, Any]) -> list[Any]:
    """The sample's images in order: paths, PIL images or HF image dicts; [] for a text-only sample."""
    value = record.get("image", record.get("images"))
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def count_image_tokens(record: Mapping[str, Any], image_token: str = IMAGE_TOKEN) -> int:
    return sum(turn.get("value", turn.get("content")).count(image_token) for turn in record["conversations"])


def move_image_to_front(messages: list[dict[str, str]], image_token: str = IMAGE_TOKEN) -> list[dict[str, str]]:
    """LLaVA-1.5 `preprocess_multimodal` for one image: its turn becomes "<image>\\n" + the rest, stripped."""
    out = []
    for m in messages:
        if image_token in m["content"]:
            rest = m["content"].replace(image_token, "").strip()
            m = {**m, "content": f"{image_token}\n{rest}".strip()}
        out.append(m)
    return out


class ConversationDataset(torch.utils.data.Dataset):
    """Per-sample dicts `{"id", "input_ids": (L,), "labels": (L,), "images": [PIL] | (N, C, H, W)}`.

    Args:
        records: list of LLaVA records or an HF `datasets.Dataset` with the same fields.
        tokenizer: HF tokenizer holding `<image>` as one special token.
        template: template name or object (see `saisa.data.templates`).
        image_folder: root for relative image paths.
        max_length: truncation length in tokens (one token per image).
        image_aspect_ratio: "pad" (LLaVA-1.5 fine-tuning: pad to square with the processor's mean colour) or
            "square" (leave it to the image processor's resize/crop, as LLaVA-1.5 pretraining does).
        image_processor: if given, images come back as a pixel tensor; otherwise as PIL images for the collator.
        background: pad colour; default: from `image_processor.image_mean`.
        llava_image_position: move a lone `<image>` to the start of its turn followed by "\\n" (LLaVA-1.5 does).
        on_fully_masked: "skip" (return a counted skip) or "raise".
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, template: str | Template, *,
                 image_folder: str | os.PathLike | None = None, max_length: int = 2048,
                 image_aspect_ratio: str = "pad", image_processor: Callable | None = None,
                 background: tuple[int, int, int] | None = None, llava_image_position: bool = True,
                 on_fully_masked: str = "skip", image_token: str = IMAGE_TOKEN, image_length: int = 1) -> None:
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        if on_fully_masked not in ("skip", "raise"):
            raise ValueError(f"on_fully_masked must be 'skip' or 'raise', got {on_fully_masked!r}")
        if image_aspect_ratio == "pad" and background is None:
            if image_processor is None:
                raise ValueError("image_aspect_ratio='pad' needs the pad colour: pass background=(r, g, b) or the "
                                 "image_processor whose image_mean LLaVA pads with")
            background = background_for(image_processor)
        self.records = records
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio
        self.image_processor = image_processor
        self.background = background
        self.llava_image_position = llava_image_position
        self.on_fully_masked = on_fully_masked
        self.image_token = image_token
        self.image_length = image_length  # tokens an image adds to `lengths` (1: SAISA's one placeholder)
        self._words: list[int] | None = None
        self._num_images: list[int] | None = None

    @classmethod
    def from_json(cls, path: str | os.PathLike, image_folder: str | os.PathLike | None = None, **kwargs: Any
                  ) -> ConversationDataset:
        """LLaVA JSON/JSONL; `image_folder` defaults to the file's directory."""
        return cls(read_records(path), image_folder=image_folder or Path(path).parent, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    # ---- length-grouped sampling ----------------------------------------------------------------------------------

    def _scan(self) -> None:
        if hasattr(self.records, "column_names"):  # HF dataset: read one column, never decode the image column
            conversations = self.records["conversations"]
        else:
            conversations = (r["conversations"] for r in self.records)
        words, images = [], []
        for conv in conversations:
            texts = [turn.get("value", turn.get("content")) or "" for turn in conv]
            words.append(sum(len(t.replace(self.image_token, " ").split()) for t in texts))
            images.append(sum(t.count(self.image_token) for t in texts))
        self._words, self._num_images = words, images

    @property
    def lengths(self) -> list[int]:
        """Estimated tokens per sample: words (LLaVA's estimate) + `image_length` per `<image>`. No image is read."""
        if self._words is None:
            self._scan()
        return [w + self.image_length * n for w, n in zip(self._words, self._num_images)]

    @property
    def is_multimodal(self) -> list[bool]:
        if self._num_images is None:
            self._scan()
        return [n > 0 for n in self._num_images]

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's signed lengths: positive for samples with images, negative for text-only ones."""
        return [n if mm else -n for n, mm in zip(self.lengths, self.is_multimodal)]

    # ---- samples --------------------------------------------------------------------------------------------------

    def resolve(self, source: Any) -> Any:
        if isinstance(source, (str, os.PathLike)) and self.image_folder is not None:
            return self.image_folder / source
        return source

    def messages(self, index: int) -> tuple[Any, list[dict[str, str]], list[Any]]:
        """(id, messages, image sources) of a sample, checked for `<image>`/image agreement."""
        record = self.records[index]
        sid = sample_id(record, index)
        if "conversations" not in record:
            raise ValueError(f"sample {sid!r} has no 'conversations' field")
        messages = to_messages(record["conversations"], sid)
        sources = [self.resolve(s) for s in image_sources(record)]
        tags = sum(m["content"].count(self.image_token) for m in messages)
        if tags != len(sources):
            raise ImageCountError(
                f"sample {sid!r}: {tags} {self.image_token!r} placeholder(s) in the text but {len(sources)} image(s); "
                f"every image needs one {self.image_token!r} in a human turn where it belongs, and vice versa"
            )
        if self.llava_image_position and tags == 1:
            messages = move_image_to_front(messages, self.image_token)
        return sid, messages, sources

    def load_images(self, sources: Sequence[Any], sid: Any) -> list[Image.Image]:
        images = []
        for src in sources:
            try:
                img = load_image(src)
            except ImageLoadError as e:
                raise ImageLoadError(f"sample {sid!r}: {e}") from None
            if self.image_aspect_ratio == "pad":
                img = expand_to_square(img, self.background)
            images.append(img)
        return images

    def __getitem__(self, index: int) -> dict[str, Any]:
        sid, messages, sources = self.messages(index)
        try:
            enc = encode_conversation(messages, self.tokenizer, self.template, max_length=self.max_length,
                                      sample_id=sid, image_token=self.image_token)
        except FullyMaskedError as e:
            if self.on_fully_masked == "raise":
                raise
            return {"id": sid, "skipped": str(e)}
        images: Any = self.load_images(sources[: enc.num_images], sid)
        if self.image_processor is not None and images:
            images = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (N, C, H, W)
        return {
            "id": sid,
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),  # (L,)
            "labels": torch.tensor(enc.labels, dtype=torch.long),  # (L,)
            "images": images,
        }
