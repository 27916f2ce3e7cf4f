"""`saisa data check`: find every sample that would crash training or train on nothing, before training starts.

Unusual here: it runs the exact code path of training (`ConversationDataset.messages`, `encode_conversation`,
`load_image`), so what it reports is what the loader would hit, not a re-implementation's opinion. Each image file is
decoded once, in a thread pool, however many samples share it. Over-long samples are reported but only count as a
problem with `strict=True`: truncation handles them, while the other findings would crash a run or zero its loss.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saisa.data.datasets import ConversationDataset, ImageCountError, read_records
from saisa.data.images import ImageLoadError, load_image
from saisa.data.templates import IMAGE_TOKEN, FullyMaskedError, Template, TemplateError, encode_conversation

PROBLEMS = ("malformed", "image_count_mismatch", "missing_image", "corrupt_image", "tokenization", "fully_masked")
WARNINGS = ("over_length",)


@dataclass
class CheckReport:
    """What `check_dataset` found: counts and a few example messages per kind."""

    num_samples: int = 0
    num_multimodal: int = 0
    num_images: int = 0
    num_tokens: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_length: int | None = None
    tokenizer_checked: bool = True
    strict: bool = False
    max_examples: int = 5

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(message)

    @property
    def failing(self) -> list[str]:
        kinds = PROBLEMS + (WARNINGS if self.strict else ())
        return [k for k in kinds if self.counts[k]]

    @property
    def ok(self) -> bool:
        return not self.failing

    def summary(self) -> str:
        lines = [f"{self.num_samples} samples ({self.num_multimodal} with images, "
                 f"{self.num_samples - self.num_multimodal} text-only), {self.num_images} image files"]
        if self.num_tokens:
            toks = sorted(self.num_tokens)
            lines.append(f"tokens per sample: mean {sum(toks) / len(toks):.0f}, median {toks[len(toks) // 2]}, "
                         f"max {toks[-1]} (max_length {self.max_length})")
        if not self.tokenizer_checked:
            lines.append("no tokenizer given: templates, masking and lengths were not checked")
        for kind in PROBLEMS + WARNINGS:
            n = self.counts[kind]
            level = "PROBLEM" if kind in self.failing else ("warning" if n else "ok")
            lines.append(f"  {kind:<22} {n:>7}  {level}")
            lines += [f"      {m}" for m in self.examples.get(kind, [])]
        lines.append("OK" if self.ok else f"FAILED: {', '.join(self.failing)}")
        return "\n".join(lines)


def _check_image(path: Any) -> tuple[str, str] | None:
    if isinstance(path, (str, os.PathLike)) and not Path(path).exists():
        return "missing_image", f"image not found: {path}"
    try:
        load_image(path)
    except ImageLoadError as e:
        return "corrupt_image", str(e)
    return None


def check_dataset(json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None, tokenizer: Any = None,
                  template: str | Template = "vicuna_v1", max_length: int = 2048, *, check_images: bool = True,
                  strict: bool = False, num_workers: int = 8, max_examples: int = 5) -> CheckReport:
    """Check a LLaVA JSON file and its images; see `CheckReport` for what is counted.

    `image_folder` defaults to the JSON file's directory; `tokenizer` (an HF tokenizer or None to skip the token
    checks) must hold `<image>` as one token.
    """
    report = CheckReport(max_length=max_length, tokenizer_checked=tokenizer is not None, strict=strict,
                         max_examples=max_examples)
    records = read_records(json_path)
    dataset = ConversationDataset(records, tokenizer, template, image_folder=image_folder or Path(json_path).parent,
                                  max_length=max_length, image_aspect_ratio="square")
    report.num_samples = len(records)
    image_users: dict[Any, list[Any]] = {}
    for i in range(len(records)):
        try:
            sid, messages, sources = dataset.messages(i)
        except ImageCountError as e:
            report.add("image_count_mismatch", str(e))
            continue
        except (TemplateError, ValueError, KeyError, TypeError, AttributeError) as e:
            sid = records[i].get("id", i) if isinstance(records[i], dict) else i
            report.add("malformed", f"sample {sid!r}: {type(e).__name__}: {e}")
            continue
        report.num_multimodal += bool(sources)
        for src in sources:
            image_users.setdefault(src if isinstance(src, (str, os.PathLike)) else id(src), []).append(sid)
        if tokenizer is None:
            continue
        try:
            enc = encode_conversation(messages, tokenizer, dataset.template, max_length=max_length, sample_id=sid,
                                      image_token=IMAGE_TOKEN)
        except FullyMaskedError as e:
            report.add("fully_masked", str(e))
            continue
        except TemplateError as e:
            report.add("tokenization", str(e))
            continue
        report.num_tokens.append(enc.num_tokens)
        if enc.truncated:
            report.add("over_length", f"sample {sid!r}: {enc.num_tokens} tokens > max_length {max_length}")
    report.num_images = len(image_users)
    if check_images:
        paths = [p for p in image_users if isinstance(p, (str, os.PathLike))]
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            for path, found in zip(paths, pool.map(_check_image, paths)):
                if found is not None:
                    kind, message = found
                    ids = image_users[path]
                    report.add(kind, f"{message} (used by sample{'s' if len(ids) > 1 else ''} "
                                     f"{', '.join(repr(s) for s in ids[:3])}{' ...' if len(ids) > 3 else ''})")
    return report


def check_main(data: str | os.PathLike, image_folder: str | os.PathLike | None = None, tokenizer: Any = None,
               template: str = "vicuna_v1", max_length: int = 2048, *, check_images: bool = True,
               strict: bool = False, num_workers: int = 8) -> int:
    """`saisa data check DATA` backend: print the report; exit code 0 if clean, 1 if problems, 2 if unreadable.

    `tokenizer`: a tokenizer object, a local path for `AutoTokenizer.from_pretrained`, or None (skip token checks).
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    try:
        report = check_dataset(data, image_folder, tokenizer, template, max_length, check_images=check_images,
                               strict=strict, num_workers=num_workers)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"saisa data check: {e}")
        return 2
    print(report.summary())
    return 0 if report.ok else 1
