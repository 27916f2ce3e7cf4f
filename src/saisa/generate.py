"""Engine: prefill and decode for SaisaForConditionalGeneration over SaisaCache, behind `model.generate`'s arguments.

Unusual here: the prefill never runs one forward over the whole prompt. Each prompt is cut at its image placeholders
into text chunks and images, and the engine appends them to the cache in turn: a text chunk is a model forward with
`past_key_values`; an image is a block of every layer's visual keys/values. That is exact because the cache and the
mask work by RoPE position (see model/cache.py, model/naavit.py): text before an image never sees it, whenever its
keys arrive. It is what lets an image's keys/values come from `ImageKVCache` instead of the vision tower. Under
saisa and naavit visual keys/values depend on the image and its start position only, so all misses of a batch are
computed up front in one forward (vision tower once per distinct image) and spliced in; under llava visual tokens
are queries that read the text before them, so each image is a model forward at its turn and the image cache is
not consulted. Rows of a left-padded batch are aligned on their last chunk, so one final forward yields every row's
first-token logits; decode steps feed one token per row with `logits_to_keep=1`.

Sampling reuses transformers' logits processors (repetition penalty, then temperature, top-k, top-p, in
`GenerationMixin`'s order), `StopStringCriteria` and the streamer put/end protocol; the image placeholder is never
generated. Output follows `model.generate`: prompt plus new tokens, rows that finished early padded with
`pad_token_id`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from saisa.image_cache import ImageKV, ImageKVCache, image_digest, model_identity
from saisa.model.cache import SaisaCache
from saisa.model.naavit import build_layout

# transformers' global defaults (GenerationConfig._get_default_generation_params) for the fields we read.
DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            "repetition_penalty": 1.0}
# Accepted and ignored when left at these values; anything else is refused rather than silently not done.
INERT = {"num_beams": 1, "num_return_sequences": 1, "output_attentions": False,
         "output_hidden_states": False, "min_new_tokens": None, "min_length": 0, "no_repeat_ngram_size": 0,
         "typical_p": 1.0, "min_p": None, "bad_words_ids": None, "penalty_alpha": None, "num_beam_groups": 1,
         "guidance_scale": None, "assistant_model": None, "prompt_lookup_num_tokens": None}
CONTEXT_FREE_ARCHS = ("saisa", "naavit")  # visual K/V depend on the image and its position only


# --------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Resolved decoding options (explicit argument > generation_config > model.generation_config > HF default)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=False "
                             "for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def resolve_settings(
    model: nn.Module, input_length: int, generation_config: GenerationConfig | None = None, **kwargs
) -> GenerationSettings:
    """Merge `kwargs` (model.generate's names) with the generation configs; refuse options this engine lacks."""
    kwargs.pop("use_cache", None)  # the engine always decodes over SaisaCache; results are the same
    for name, inert in INERT.items():
        if kwargs.pop(name, None) not in (None, inert):
            raise ValueError(f"generate(): {name} is not supported by saisa's engine (greedy and sampling only)")
    known = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "eos_token_id", "pad_token_id", "stop_strings"}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"generate() got unsupported argument(s) {sorted(unknown)}; supported: {sorted(known)}")
    configs = [c for c in (generation_config, getattr(model, "generation_config", None)) if c is not None]
    text_config = model.config.get_text_config()

    def pick(name: str, fallback=None):
        if kwargs.get(name) is not None:
            return kwargs[name]
        for c in configs:
            if getattr(c, name, None) is not None:
                return getattr(c, name)
        return DEFAULTS.get(name, fallback)

    max_new = kwargs.get("max_new_tokens")
    if max_new is None and kwargs.get("max_length") is not None:
        max_new = kwargs["max_length"] - input_length
    if max_new is None:
        max_new = next((c.max_new_tokens for c in configs if c.max_new_tokens is not None), None)
    if max_new is None:
        max_new = pick("max_length") - input_length
    if max_new < 1:
        raise ValueError(f"the prompt has {input_length} tokens, which leaves max_new_tokens={max_new}; pass "
                         "max_new_tokens= (max_length counts the prompt too)")
    eos = _as_ids(pick("eos_token_id", getattr(text_config, "eos_token_id", None)))
    pad = pick("pad_token_id", getattr(text_config, "pad_token_id", None))
    if pad is None and eos:
        pad = eos[0]
    stop = pick("stop_strings") or ()
    return GenerationSettings(
        max_new_tokens=int(max_new), do_sample=bool(pick("do_sample")), temperature=float(pick("temperature")),
        top_k=pick("top_k"), top_p=float(pick("top_p")), repetition_penalty=float(pick("repetition_penalty")),
        eos_token_ids=eos, pad_token_id=pad, stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def logits_processors(settings: GenerationSettings, suppress: Sequence[int], device) -> LogitsProcessorList:
    """transformers' processors in GenerationMixin's order; warpers only when sampling."""
    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if suppress:
        procs.append(SuppressTokensLogitsProcessor(list(suppress), device=device))
    if settings.do_sample:
        if settings.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            procs.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=settings.top_p))
    return procs


# ------------------------------------------------------------------------------------------------------ prompt plan
@dataclass(frozen=True)
class PromptPlan:
    """A padded batch cut at its image placeholders, rows right-aligned so that every row's last chunk is the last.

    text[s] = (ids (B, W_s), mask (B, W_s)) left-padded; images[s] = (rows (R,), image index (R,)) for s < steps - 1.
    """

    text: list[tuple[torch.Tensor, torch.Tensor]]
    images: list[tuple[torch.Tensor, torch.Tensor]]
    image_start: torch.Tensor  # (N,) first RoPE position of each image, in reading order


def plan_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, layout) -> PromptPlan:
    rows_ids = input_ids.tolist()
    rows_mask = attention_mask.tolist()
    slots = layout.image_slots.tolist()
    chunks: list[list[list[int]]] = []
    for b, (ids, mask) in enumerate(zip(rows_ids, rows_mask)):
        parts: list[list[int]] = [[]]
        for tok, m in zip(ids, mask):
            if not m:
                continue
            if tok == image_token_id:
                parts.append([])
            else:
                parts[-1].append(tok)
        if not parts[-1]:
            where = "is empty" if len(parts) == 1 else "ends with an image placeholder"
            raise ValueError(f"prompt row {b} {where}: generation continues from a text token, so put text after "
                             "the last image (a chat template's generation prompt does this)")
        chunks.append(parts)
    steps = max(len(p) for p in chunks)
    device = input_ids.device
    text, images = [], []
    for s in range(steps):
        seqs = [p[s - (steps - len(p))] if s >= steps - len(p) else [] for p in chunks]
        width = max(len(q) for q in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, q in enumerate(seqs):
            if q:
                ids[b, width - len(q):] = torch.tensor(q)
                mask[b, width - len(q):] = 1
        text.append((ids.to(device), mask.to(device)))
        if s < steps - 1:
            rows = [b for b, p in enumerate(chunks) if s >= steps - len(p)]
            index = [slots[b][s - (steps - len(chunks[b]))] for b in rows]
            images.append((torch.tensor(rows, device=device), torch.tensor(index, device=device)))
    n = int((layout.image_slots >= 0).sum())
    image_start = torch.zeros(n, dtype=torch.long, device=device)
    valid = layout.image_slots >= 0
    image_start[layout.image_slots[valid]] = layout.image_start[valid]
    return PromptPlan(text, images, image_start)


# ----------------------------------------------------------------------------------------------------------- engine
@dataclass
class Timings:
    """Seconds per phase of the last `Engine.generate` (CUDA-synchronised when the engine has `sync=True`)."""

    vision_s: float = 0.0  # vision tower on the images that missed the image cache
    visual_kv_s: float = 0.0  # projector + every layer's visual K/V (saisa/naavit), or image forwards (llava)
    text_prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0  # text tokens fed in the prefill (padding excluded)
    new_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_s(self) -> float:
        return self.vision_s + self.visual_kv_s + self.text_prefill_s


class Engine:
    """Prefill + decode over token ids and pixel values for one model; knows nothing of text or templates.

    `image_cache`: an `ImageKVCache` shared across calls (saisa/naavit only). `sync`: synchronise CUDA around each
    phase so `timings` are exact (costs a little overlap).
    """

    def __init__(self, model: nn.Module, image_cache: ImageKVCache | None = None, sync: bool = False) -> None:
        self.model = model
        self.image_cache = image_cache
        self.sync = sync
        self.timings = Timings()
        self.context_free = model.config.architecture in CONTEXT_FREE_ARCHS

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def _clock(self, phase: str):
        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        setattr(self.timings, phase, getattr(self.timings, phase) + time.perf_counter() - t0)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cache: SaisaCache | None = None,
        image_keys: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, SaisaCache]:
        """Append a prompt batch to `cache` (a new one if None). Returns each row's last-token logits (B, V) in fp32.

        input_ids (B, L) with one image_token_id per image, left- or right-padded; pixel_values (N, C, H, W) the
        images in reading order; image_keys: optional content keys (e.g. file digests) replacing pixel hashing.
        """
        model = self.model
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)} "
                             "(with a cache, pass the mask of the new tokens only)")
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        start = None if cache is None else cache.next_pos
        layout = build_layout(input_ids, mask, model.config.image_token_id, model.num_visual_tokens, n_images, start)
        plan = plan_prompt(input_ids, mask, model.config.image_token_id, layout)
        cache = SaisaCache(len(model.layers)) if cache is None else cache
        if image_keys is not None and len(image_keys) != n_images:
            raise ValueError(f"got {len(image_keys)} image_keys for {n_images} image(s)")
        visual = features = None
        if n_images and self.context_free:
            visual = self._visual_kv(pixel_values.to(self.device), plan.image_start, image_keys)
        elif n_images:
            with self._clock("vision_s"):
                features = model.encode_images(pixel_values.to(self.device))
        logits = None
        for s, (ids, m) in enumerate(plan.text):
            if ids.shape[1]:
                with self._clock("text_prefill_s"):
                    logits = model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True,
                                   logits_to_keep=1).logits[:, -1]
            if s < len(plan.images):
                rows, index = plan.images[s]
                with self._clock("visual_kv_s"):
                    if visual is not None:
                        self._splice(cache, rows, [visual[i] for i in index.tolist()], input_ids.shape[0])
                    else:
                        self._image_forward(cache, rows, features[index], input_ids.shape[0])
        self.timings.prefill_tokens += int(mask.sum()) - n_images
        return logits.float(), cache

    def _visual_kv(self, pixels: torch.Tensor, starts: torch.Tensor, image_keys) -> list[ImageKV]:
        """Every layer's visual K/V for each image at its start position: from the image cache or computed."""
        cache = self.image_cache
        n = pixels.shape[0]
        if cache is None:
            keys = list(range(n))
            content = list(range(n))
        else:
            ident = model_identity(self.model)
            content = list(image_keys) if image_keys is not None else [image_digest(p) for p in pixels]
            keys = [(ident, c, s) for c, s in zip(content, starts.tolist())]
        found = {}
        for i, key in enumerate(keys):
            if key not in found:
                found[key] = cache.get(key) if cache is not None else None
        missing = [k for k, e in found.items() if e is None]
        if missing:
            t0 = time.perf_counter()
            first = {k: keys.index(k) for k in missing}  # representative image of each missing key
            distinct = list(dict.fromkeys(content[first[k]] for k in missing))  # encode each content once
            rep = [content.index(c) for c in distinct]
            with self._clock("vision_s"):
                z = self.model.encode_images(pixels[rep])  # (U, v, d)
            z = z[[distinct.index(content[first[k]]) for k in missing]]
            with self._clock("visual_kv_s"):
                computed = self._compute_visual_kv(z, starts[[first[k] for k in missing]])
            for k, entry in zip(missing, computed):
                found[k] = entry
                if cache is not None:
                    cache.put(k, entry)
            if cache is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                cache.miss_seconds += time.perf_counter() - t0
        return [found[k] for k in keys]

    def _compute_visual_kv(self, features: torch.Tensor, starts: torch.Tensor) -> list[ImageKV]:
        """One forward of a placeholder per image over a scratch cache whose positions start at `starts` (M,)."""
        model = self.model
        v = features.shape[1]
        scratch = SaisaCache(len(model.layers))
        scratch.next_pos = starts.to(self.device)
        ids = torch.full((features.shape[0], 1), model.config.image_token_id, device=self.device)
        model(input_ids=ids, image_features=features, past_key_values=scratch, use_cache=True, logits_to_keep=1)
        keys = torch.stack([k[:, :, :v] for k in scratch.keys], dim=1)  # (M, n_layers, Hkv, v, D)
        values = torch.stack([x[:, :, :v] for x in scratch.values], dim=1)
        return [ImageKV(k, x) for k, x in zip(keys, values)]

    @staticmethod
    def _splice(cache: SaisaCache, rows: torch.Tensor, entries: list[ImageKV], batch: int) -> None:
        """Append one image per row in `rows` as a block of v keys per layer; other rows get invalid keys."""
        keys = torch.stack([e.keys for e in entries], dim=1)  # (n_layers, R, Hkv, v, D)
        values = torch.stack([e.values for e in entries], dim=1)
        n_layers, _, hkv, v, d = keys.shape
        block_k = keys.new_zeros(n_layers, batch, hkv, v, d)
        block_v = values.new_zeros(n_layers, batch, hkv, v, d)
        block_k[:, rows], block_v[:, rows] = keys, values
        start = cache.next_pos if cache.next_pos is not None else rows.new_zeros(batch)
        valid = torch.zeros(batch, v, dtype=torch.bool, device=rows.device)
        valid[rows] = True
        next_pos = start.clone()
        next_pos[rows] += v
        cache.append_block(list(block_k), list(block_v), start[:, None] + torch.arange(v, device=rows.device), valid,
                           next_pos)

    def _image_forward(self, cache: SaisaCache, rows: torch.Tensor, features: torch.Tensor, batch: int) -> None:
        """llava: the images of `rows` as a forward of one placeholder each, attending to everything before them."""
        ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        ids[rows], mask[rows] = self.model.config.image_token_id, 1
        self.model(input_ids=ids, attention_mask=mask, image_features=features, past_key_values=cache,
                   use_cache=True, logits_to_keep=1)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        settings: GenerationSettings,
        cache: SaisaCache | None = None,
        image_keys: Sequence[str] | None = None,
        tokenizer=None,
        streamer=None,
        generator: torch.Generator | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        output_scores: bool = False,
        output_logits: bool = False,
    ) -> GenerateDecoderOnlyOutput:
        """Prefill, then decode up to `settings.max_new_tokens` tokens per row.

        With `cache`, input_ids are only the tokens to append after it. Returns sequences (B, L + new) and the cache,
        which then holds every token except the last one generated.
        """
        self.timings = Timings()
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        batch = input_ids.shape[0]
        if streamer is not None and batch != 1:
            raise ValueError(f"streaming needs a batch of 1 prompt, got {batch}")
        if settings.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=")
        needs_pad = batch > 1 and (settings.eos_token_ids or settings.stop_strings or stopping_criteria)
        if needs_pad and settings.pad_token_id is None:
            raise ValueError("rows may finish at different steps, so pad_token_id (or eos_token_id) is needed")
        processors = logits_processors(settings, [self.model.config.image_token_id], self.device)
        processors.extend(logits_processor or [])
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if settings.stop_strings:
            criteria.append(StopStringCriteria(tokenizer, list(settings.stop_strings)))
        eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=self.device)
        pad = settings.pad_token_id if settings.pad_token_id is not None else 0

        if streamer is not None:
            streamer.put(input_ids.cpu())
        try:
            logits, cache = self.prefill(input_ids, mask, pixel_values, cache, image_keys)
            # Processors read the ids; left padding is refilled with a token of the row itself so that a batch
            # penalises exactly what each prompt alone would.
            last = input_ids.gather(1, (mask.cumsum(1).argmax(1))[:, None])
            seen = torch.where(mask.bool(), input_ids, last)
            sequences = input_ids
            unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
            scores, raw = [], []
            t0 = time.perf_counter()
            for step in range(settings.max_new_tokens):
                processed = processors(seen, logits)  # transformers' processors return new tensors
                if output_scores:
                    scores.append(processed)
                if output_logits:
                    raw.append(logits)
                if settings.do_sample:
                    probs = processed.softmax(-1)
                    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    tokens = processed.argmax(-1)
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
                sequences = torch.cat([sequences, tokens[:, None]], dim=1)
                seen = torch.cat([seen, tokens[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(tokens.cpu())
                done = torch.isin(tokens, eos) if eos.numel() else torch.zeros_like(unfinished)
                if criteria:
                    done = done | criteria(sequences, processed)
                unfinished = unfinished & ~done
                if not unfinished.any() or step == settings.max_new_tokens - 1:
                    break
                logits = self.model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True,
                                    logits_to_keep=1).logits[:, -1].float()
            if self.device.type == "cuda" and self.sync:
                torch.cuda.synchronize(self.device)
            self.timings.decode_s = time.perf_counter() - t0
            self.timings.new_tokens = sequences.shape[1] - input_ids.shape[1]
        finally:
            if streamer is not None:
                streamer.end()
        return GenerateDecoderOnlyOutput(
            sequences=sequences, scores=tuple(scores) if output_scores else None,
            logits=tuple(raw) if output_logits else None, past_key_values=cache,
        )


# --------------------------------------------------------------------------------------------- model.generate entry
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    tokenizer=None,
    streamer=None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    image_cache: ImageKVCache | None = None,
    image_keys: Sequence[str] | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    output_logits: bool = False,
    **kwargs,
):
    """`model.generate` for SaisaForConditionalGeneration: greedy or sampled decoding over SaisaCache.

    input_ids (B, L) with one image_token_id per image (left padding for batches), attention_mask (B, L),
    pixel_values (N, C, H, W) for the N images in reading order. Decoding options as transformers: max_new_tokens
    (or max_length), do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id (int or list),
    pad_token_id, stop_strings (with tokenizer=); plus streamer (put/end), generator or seed for sampling, and
    image_cache (an ImageKVCache reused across calls). Returns (B, L + new) token ids like transformers, or a
    GenerateDecoderOnlyOutput (sequences, scores, logits, past_key_values) with return_dict_in_generate=True.
    """
    if input_ids is None:
        raise ValueError("generate() needs input_ids (B, L); build them with SaisaProcessor")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    settings = resolve_settings(model, input_ids.shape[1], generation_config, **kwargs)
    engine = Engine(model, image_cache=image_cache)
    if generator is None and seed is not None:
        generator = torch.Generator(device=engine.device).manual_seed(seed)
    out = engine.generate(
        input_ids, attention_mask, pixel_values, settings=settings, image_keys=image_keys, tokenizer=tokenizer,
        streamer=streamer, generator=generator, logits_processor=logits_processor,
        stopping_criteria=stopping_criteria, output_scores=output_scores, output_logits=output_logits,
    )
    return out if return_dict_in_generate else out.sequences
