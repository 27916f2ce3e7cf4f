"""Multi-turn chat: `ChatSession` keeps the conversation's SaisaCache, and `saisa chat` is a REPL over it.

Unusual here: a new turn is prefilled as a suffix. The session remembers the exact text its cache holds (the
rendered prompt plus the generated tokens); when the chat template renders the longer conversation as that text
plus more, only the new text (and the last generated token, which no forward has consumed yet) is fed. When it does
not (a template that rewrites old turns, a reply that does not round-trip through the tokenizer), the session
re-prefills the whole conversation: slower, never wrong. Images of a turn go through the engine's ImageKVCache.

The REPL reads lines from stdin, so a transcript can be piped in: a line is a question; `/image FILE` attaches
FILE to the next question (earlier images stay in the conversation), `/reset` forgets the conversation, `/stats`
prints timings and image-cache counters, `/quit` ends.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TextStreamer

from saisa.data.processor import SaisaProcessor
from saisa.generate import Engine, resolve_settings
from saisa.image_cache import ImageKVCache


class ChatSession:
    """A conversation with one model: `ask(text, images)` returns the reply; `reset()` starts over.

    `generation_kwargs` are model.generate's options (max_new_tokens, do_sample, temperature, ...), defaults for
    every turn. Stops at the tokenizer's eos token unless the model's generation config names one.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: SaisaProcessor,
        *,
        image_cache: ImageKVCache | None = None,
        system: str | None = None,
        **generation_kwargs: Any,
    ) -> None:
        if processor.image_token_id != model.config.image_token_id:
            raise ValueError(f"the processor's <image> id {processor.image_token_id} differs from the model's "
                             f"image_token_id {model.config.image_token_id}: they were not saved together")
        self.model, self.processor = model, processor
        self.engine = Engine(model, image_cache=image_cache)
        self.system = system
        if generation_kwargs.get("eos_token_id") is None and model.generation_config.eos_token_id is None:
            generation_kwargs["eos_token_id"] = processor.tokenizer.eos_token_id
        self.generation_kwargs = generation_kwargs
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self.cached_text = ""  # what the cache holds, as text (plus the pending token)
        self.pending: torch.Tensor | None = None  # (1, 1) last generated token, not yet in the cache
        self.reprefills = 0  # turns whose suffix could not be used

    def _decode(self, ids: torch.Tensor, skip: bool) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def ask(self, text: str, images: Sequence[Any] = (), streamer=None, generator: torch.Generator | None = None,
            **generation_kwargs: Any) -> str:
        """Add a user turn (its images first: PIL images or paths, then text) and return the reply text."""
        loaded = self.processor.load_images(list(images))  # fail on a bad file before touching the conversation
        content = [{"type": "image", "image": img} for img in loaded] + [{"type": "text", "text": text}]
        messages = self.messages + [{"role": "user", "content": content}]
        rendered, all_images = self.processor.render(messages, add_generation_prompt=True)
        if self.cache is not None and rendered.startswith(self.cached_text):
            enc = self.processor(text=rendered[len(self.cached_text):], images=loaded or None,
                                 add_special_tokens=False)
            input_ids = torch.cat([self.pending, enc["input_ids"]], dim=1)
            cache = self.cache
        else:
            if self.cache is not None:
                self.reprefills += 1
            enc = self.processor(text=rendered, images=all_images or None, add_special_tokens=False)
            input_ids, cache = enc["input_ids"], None
        settings = resolve_settings(self.model, input_ids.shape[1], **{**self.generation_kwargs, **generation_kwargs})
        out = self.engine.generate(input_ids, pixel_values=enc.get("pixel_values"), settings=settings, cache=cache,
                                   tokenizer=self.processor.tokenizer, streamer=streamer, generator=generator)
        new = out.sequences[0, input_ids.shape[1]:].cpu()
        reply = self._decode(new, skip=True)
        self.cache, self.pending = out.past_key_values, new[-1:][None]
        self.cached_text = rendered + self._decode(new, skip=False)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply


# ------------------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a from_pretrained folder (model + processor or tokenizer)")
    parser.add_argument("--image", help="image attached to the first question")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--image-cache-mb", type=int, default=1024, help="image K/V cache bound (default 1024 MiB)")


def _load(args: argparse.Namespace):
    import os

    from saisa import SaisaConfig, SaisaForConditionalGeneration
    from saisa.data.processor import load_processor

    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: not a folder (expected one written by save_pretrained)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    config = SaisaConfig.from_pretrained(args.model)
    processor = load_processor(args.model, config)
    model = SaisaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    return model, processor


def run(args: argparse.Namespace) -> int:
    from saisa.data.images import ImageLoadError

    try:
        model, processor = _load(args)
    except (OSError, ValueError) as e:
        print(f"saisa chat: {e}", file=sys.stderr)
        return 2
    sampling = dict(do_sample=args.temperature > 0, max_new_tokens=args.max_new_tokens,
                    repetition_penalty=args.repetition_penalty)
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    session = ChatSession(model, processor, image_cache=ImageKVCache(args.image_cache_mb << 20), system=args.system,
                          **sampling)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=session.engine.device).manual_seed(args.seed)
    images = []
    if args.image:
        try:
            images = processor.load_images([args.image])
        except ImageLoadError as e:
            print(f"saisa chat: {e}", file=sys.stderr)
            return 2
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            print("[conversation reset]", flush=True)
        elif line == "/stats":
            t = session.engine.timings
            print(f"[last turn: prefill {1e3 * t.prefill_s:.1f} ms (vision {1e3 * t.vision_s:.1f}, visual K/V "
                  f"{1e3 * t.visual_kv_s:.1f}, text {1e3 * t.text_prefill_s:.1f}; {t.prefill_tokens} tokens), decode "
                  f"{1e3 * t.decode_s:.1f} ms for {t.new_tokens} tokens; {session.engine.image_cache!r}]", flush=True)
        elif line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                images = processor.load_images([path]) if path else []
            except ImageLoadError as e:
                print(f"[error: {e}]", flush=True)
                continue
            print(f"[image {path} attached to the next question]" if path else "[usage: /image FILE]", flush=True)
        elif line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; commands: /image FILE, /reset, /stats, /quit]", flush=True)
        else:
            streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            session.ask(line, images, streamer=streamer, generator=generator)
            images = []
