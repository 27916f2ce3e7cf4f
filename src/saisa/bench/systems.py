"""Benchmark systems: the models (HF LLaVA materialised with random weights, ours borrowing them) and the adapters
that run them eagerly, through CUDA graphs or torch.compile.

Unusual here: one set of 7B weights serves every system. HF LLaVA is built on the meta device and materialised with
random values (latency does not depend on them); our three architectures borrow its language model, lm_head and
vision tower (llava/naavit its projector too) by module assignment, so the weights exist once and switching systems
loads nothing. A system is a small adapter: `prepare(batch, t, sets)`, `prefill()` (projector + LLM, features Z
given, the paper's Table 6 metric), `ttft()` (vision tower + prefill + first token), `start_decode()` /
`decode_step()`, `release()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from saisa.model.graphs import capture_graph

from .setting import Setting, vision_spec
from .timing import MIB, free_memory, is_cuda, tensor_bytes, time_fn

# Prefill schedules of the compiled saisa path by name: arguments of `set_prefill_schedule` (and of
# `optimize_for_inference`). scripts/profile_prefill.py times them one against another (H100, t=64, interleaved
# rounds: serial 8.97 ms, overlap 9.26, head4 9.02, head8 8.99; benchmarks/results/profile-prefill-h100-t64.json).
SAISA_SCHEDULES: dict[str, dict[str, Any]] = {
    # All layers' projector MLPs in two bmm's, then the text layers, on one stream.
    "serial": {"chunk": None, "overlap": False},
    # One layer's visual inputs per chunk on a side stream, overlapping the text layers (the bench's setting until
    # 2026-11-22).
    "overlap": {"chunk": 1, "overlap": True},
    # The first 4 (8) layers' visual inputs, then the other layers' in one batched step on a side stream while the
    # text layers 0-3 (0-7) run: the batched steps' efficiency, with some overlap.
    "head4": {"chunk": (4,), "overlap": True},
    "head8": {"chunk": (8,), "overlap": True},
}
AUTO = "auto"  # time every schedule per shape and keep the fastest (OursGraphed)


# ----------------------------------------------------------------------------------------------------- building
class _Building:
    """Build modules on the meta device with `dtype` as the default (float32 buffers such as inv_freq stay float32,
    as they do under `from_pretrained(dtype=...)`)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self._old = dtype, None

    def __enter__(self):
        self._old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        self._meta = torch.device("meta")
        self._meta.__enter__()

    def __exit__(self, *exc):
        self._meta.__exit__(*exc)
        torch.set_default_dtype(self._old)


def _rebuilt_buffer(module: nn.Module, name: str, meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The true value of a buffer left on meta: the ones HF towers and LLMs hold are derived from the config."""
    if name in ("inv_freq", "original_inv_freq") and hasattr(module, "config"):
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)  # RoPE tables, computed as the module's __init__ does
        return getattr(fresh, name).to(device)
    if name == "position_ids":
        return torch.arange(meta.shape[-1], device=device).expand(meta.shape).to(meta.dtype)
    raise RuntimeError(
        f"cannot fill buffer {name!r} of {type(module).__name__} left on the meta device; teach "
        f"saisa.bench.systems._rebuilt_buffer its value rather than timing on garbage"
    )


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int = 0) -> nn.Module:
    """Allocate every tensor still on meta on `device`: weights and biases ~ N(0, 0.02), norm weights ~ N(1, 0.02),
    buffers their true values. Tensors already real (borrowed) are untouched; tied parameters stay tied."""
    gen = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                data = torch.empty_like(param, device=device)
                # Norm weights near 1, not exactly 1, so a norm applied twice or skipped changes the logits.
                data.normal_(1.0 if is_norm and name == "weight" else 0.0, 0.02, generator=gen)
                done[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            setattr(module, name, done[id(param)])
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                setattr(module, name, _rebuilt_buffer(module, name, buf, device))
    return model


def _borrow(owner: nn.Module, name: str, donor: nn.Module) -> None:
    """Make `owner.<name>` use `donor`'s tensors: the module itself when the classes match, else its state dict."""
    mine = getattr(owner, name)
    if type(mine) is type(donor):
        setattr(owner, name, donor)
    else:
        mine.load_state_dict(donor.state_dict(), assign=True)  # raises when the layouts differ


def build_hf_llava(setting: Setting, device: torch.device, seed: int = 0) -> nn.Module:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(setting.vision_config), text_config=dict(setting.text_config),
        image_token_index=setting.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", attn_implementation="sdpa",
    )
    with _Building(getattr(torch, setting.dtype)):
        model = LlavaForConditionalGeneration(config)
    model = materialize(model, device, seed).eval()
    model.requires_grad_(False)
    return model


def build_ours(
    setting: Setting, architecture: str, device: torch.device, *, text_config: dict[str, Any] | None = None,
    donor: nn.Module | None = None, borrow_projector: bool = False, seed: int = 1, **config: Any,
) -> nn.Module:
    """Our model; with `donor` (an HF LLaVA or one of ours) it borrows the donor's LLM, lm_head and vision tower,
    and its projector for llava/naavit from HF or with `borrow_projector`, so only what is new gets allocated."""
    from saisa import SaisaConfig, SaisaForConditionalGeneration

    setting = replace(setting, text_config=text_config or setting.text_config)
    cfg = SaisaConfig(vision_config=dict(setting.vision_config), text_config=dict(setting.text_config),
                      architecture=architecture, image_token_id=setting.image_token_id, **config)
    with _Building(getattr(torch, setting.dtype)):
        model = SaisaForConditionalGeneration(cfg)
    if donor is not None:
        hf = hasattr(donor, "model") and hasattr(donor.model, "language_model")  # LlavaForConditionalGeneration
        _borrow(model.language_model, "model", donor.model.language_model if hf else donor.language_model.model)
        _borrow(model.language_model, "lm_head", donor.lm_head if hf else donor.language_model.lm_head)
        _borrow(model, "vision_tower", donor.model.vision_tower if hf else donor.vision_tower)
        if hf and architecture != "saisa":
            model.multi_modal_projector.load_state_dict(donor.model.multi_modal_projector.state_dict(), assign=True)
        elif borrow_projector:
            _borrow(model, "multi_modal_projector", donor.multi_modal_projector)
    model = materialize(model, device, seed).eval()
    model.requires_grad_(False)  # inference by default; Suite.train turns on what a stage trains
    return model


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """One input set of a (batch, t) shape, for every system."""

    ids: torch.Tensor  # (B, t + 1): ours, one image_token_id per sample
    hf_ids: torch.Tensor  # (B, t + v): HF LLaVA, the placeholder expanded to v tokens
    features: torch.Tensor  # Z (B, v, d)
    pixels: torch.Tensor  # (B, C, H, W)
    next_token: torch.Tensor  # (B, 1): a decode step's input


def make_inputs(setting: Setting, batch: int, t: int, device: torch.device, seed: int = 0) -> list[Inputs]:
    """`setting.input_sets` random sets (never zeros): t text tokens with the image after `image_at` of them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, setting.dtype)
    vocab, image_id = setting.text_config["vocab_size"], setting.image_token_id
    vspec, vc = vision_spec(setting.vision_config), setting.vision_config
    at = min(setting.image_at, t // 2)
    sets = []
    for _ in range(setting.input_sets):
        text = torch.randint(3, vocab - 1, (batch, t), device=device, generator=gen)
        image = torch.full((batch, 1), image_id, device=device, dtype=text.dtype)
        ids = torch.cat([text[:, :at], image, text[:, at:]], dim=1)
        hf_ids = torch.cat([text[:, :at], image.expand(-1, vspec.num_tokens), text[:, at:]], dim=1)
        sets.append(Inputs(
            ids=ids, hf_ids=hf_ids,
            features=torch.randn(batch, vspec.num_tokens, vspec.feature_dim, device=device, dtype=dtype,
                                 generator=gen),
            pixels=torch.randn(batch, 3, vc["image_size"], vc["image_size"], device=device, dtype=dtype,
                               generator=gen),
            next_token=torch.randint(3, vocab - 1, (batch, 1), device=device, generator=gen),
        ))
    return sets


# ----------------------------------------------------------------------------------------------------- systems
class System:
    """Adapter over one model and one way of running it. Subclasses implement the calls they support; the others
    raise NotImplementedError (recorded as "n/a")."""

    source = "saisa"  # "saisa" (ours) or "hf"
    variant = "eager"
    decodes = True

    def __init__(self, name: str, model: nn.Module, arch: str) -> None:
        self.name, self.model, self.arch = name, model, arch
        self.method = self.variant  # what actually ran (a fallback may change it)
        self.note = ""
        self.extra_bytes = 0  # non-parameter memory the system owns (e.g. folded weights)
        self.sets: list[Inputs] = []
        self._k = 0

    # -- what the floor reads
    def llm_modules(self) -> list[nn.Module]:
        """Modules a prefill reads in full: decoder layers, final norm, lm_head, projector (not the embedding table)."""
        lm = self.model.language_model
        return [lm.model.layers, lm.model.norm, lm.lm_head, self.model.multi_modal_projector]

    def tower(self) -> nn.Module:
        return self.model.vision_tower

    def own_bytes(self) -> int:
        return tensor_bytes(self.model.parameters()) + self.extra_bytes

    def llm_bytes(self) -> int:
        return tensor_bytes(p for m in self.llm_modules() for p in m.parameters())

    def info(self) -> dict[str, Any]:
        return {"source": self.source, "arch": self.arch, "variant": self.variant, "method": self.method,
                "note": self.note, "params_mb": round(self.own_bytes() / MIB, 1)}

    # -- calls
    def prepare(self, batch: int, t: int, sets: list[Inputs]) -> None:
        self.sets, self._k = sets, 0

    def _next(self) -> Inputs:
        s = self.sets[self._k % len(self.sets)]
        self._k += 1
        return s

    def entry_info(self) -> dict[str, Any]:
        """What this system adds to the entry of the shape last prepared (e.g. the schedule it ran)."""
        return {}

    def prefill(self) -> torch.Tensor:
        raise NotImplementedError

    def ttft(self) -> torch.Tensor:
        raise NotImplementedError

    def start_decode(self) -> None:
        raise NotImplementedError(f"{self.name} has no decode path")

    def decode_step(self) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no decode path")

    def release(self) -> None:
        self.sets, self._k = [], 0


class OursEager(System):
    """Our model's forward as a user calls it (layout built on the host each call); prefill fills a SaisaCache."""

    def prefill(self):
        s = self._next()
        return self.model(input_ids=s.ids, image_features=s.features, use_cache=True, logits_to_keep=1).logits

    def ttft(self):
        s = self._next()
        out = self.model(input_ids=s.ids, pixel_values=s.pixels, use_cache=True, logits_to_keep=1)
        return out.logits.argmax(-1)

    def start_decode(self):
        s = self.sets[0]
        out = self.model(input_ids=s.ids, image_features=s.features, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        # Restoring this snapshot after each step keeps the context at its length (the cache's lists are copied;
        # its tensors are shared, never written in place).
        self._snapshot = {k: list(v) if isinstance(v, list) else v for k, v in vars(self.cache).items()}

    def decode_step(self):
        s = self._next()
        out = self.model(input_ids=s.next_token, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        token = out.logits.argmax(-1)
        vars(self.cache).update({k: list(v) if isinstance(v, list) else v for k, v in self._snapshot.items()})
        return token

    def release(self):
        super().release()
        self.cache = self._snapshot = None


class OursGraphed(OursEager):
    """The CUDA-graph fast path (`saisa.model.graphs.GraphedForward`) over a model prepared for inference.

    saisa: `schedule` names a prefill schedule (SAISA_SCHEDULES), or "auto": at each new (batch, t) every schedule
    is captured and timed (10 replays) and the fastest is kept for that shape (ttft reuses prefill's choice); the
    entry records the schedule and the trials. `base`: the schedule the model was optimized with, restored on
    release (saisa_opt runs the same model object)."""

    variant = "cuda_graph"
    decodes = False

    def __init__(self, name, model, arch, schedule: str | None = None, base: str = "serial") -> None:
        super().__init__(name, model, arch)
        if schedule not in (None, AUTO, *SAISA_SCHEDULES):
            raise ValueError(f"unknown schedule {schedule!r}; choose from {(AUTO, *SAISA_SCHEDULES)}")
        self.schedule, self.base = schedule, base
        self.chosen: dict[tuple[int, int], str] = {}
        self.trials: dict[tuple[int, int], dict[str, Any]] = {}
        self._shape: tuple[int, int] | None = None
        self.graphed = None

    def _capture(self, sets):
        from saisa.model.graphs import GraphedForward

        return GraphedForward(self.model, sets[0].ids, None, sets[0].features, logits_to_keep=1)

    def _pick(self, batch: int, t: int, sets) -> str:
        """The schedule for this shape: the one named, or under "auto" the fastest of all (timed once per shape)."""
        if self.schedule != AUTO:
            return self.schedule
        if (batch, t) not in self.chosen:
            device = sets[0].features.device
            trials: dict[str, Any] = {}
            for name, kw in SAISA_SCHEDULES.items():
                graph = None
                try:
                    self.model.set_prefill_schedule(**kw)
                    graph = self._capture(sets)
                    timing = time_fn(lambda i, g=graph: g(sets[i % len(sets)].features), device, warmup=3,
                                     repeats=10)
                    trials[name] = round(timing.median_ms, 3)
                except Exception as err:  # noqa: BLE001 - a schedule that cannot run here is not chosen
                    trials[name] = f"{type(err).__name__}: {str(err)[:200]}"
                finally:
                    graph = None
                    free_memory(device)
            timed = {n: ms for n, ms in trials.items() if isinstance(ms, float)}
            if not timed:
                raise RuntimeError(f"no prefill schedule ran: {trials}")
            self.chosen[(batch, t)] = min(timed, key=timed.get)
            self.trials[(batch, t)] = trials
            if is_cuda(device):  # the entry's peak memory is the chosen graph's, not the trials'
                torch.cuda.reset_peak_memory_stats(device)
        return self.chosen[(batch, t)]

    def prepare(self, batch, t, sets):
        super().prepare(batch, t, sets)
        self._shape = (batch, t)
        if self.schedule is not None:
            self.chosen[(batch, t)] = self._pick(batch, t, sets)
            self.model.set_prefill_schedule(**SAISA_SCHEDULES[self.chosen[(batch, t)]])
        self.graphed = self._capture(sets)

    def entry_info(self):
        if self.schedule is None or self._shape not in self.chosen:
            return {}
        name = self.chosen[self._shape]
        info: dict[str, Any] = {"schedule": name, "schedule_settings": _jsonable(SAISA_SCHEDULES[name])}
        if self._shape in self.trials:
            info["schedule_trials_ms"] = self.trials[self._shape]
        return info

    def info(self):
        return {**super().info(), **({"schedule": self.schedule} if self.schedule is not None else {})}

    def prefill(self):
        return self.graphed(self._next().features)

    def ttft(self):
        s = self._next()
        return self.graphed(self.model.encode_images(s.pixels)).argmax(-1)

    def release(self):
        super().release()
        self.graphed = None
        if self.schedule is not None:
            self.model.set_prefill_schedule(**SAISA_SCHEDULES[self.base])


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _hf_prefill(hf: nn.Module, ids: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None,
                use_cache: bool):
    """HF LLaVA from given features Z: project, splice into the expanded sequence (as LlavaModel.forward does),
    then language model + lm_head on the last position (logits_to_keep=1, as `generate` does)."""
    embeds = hf.get_input_embeddings()(ids)  # (B, t + v, h)
    image = hf.model.multi_modal_projector(features).to(embeds.dtype)  # (B, v, h)
    if mask is None:
        mask = hf.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image)
    embeds = embeds.masked_scatter(mask, image)
    return hf(inputs_embeds=embeds, use_cache=use_cache, logits_to_keep=1)


def _hf_image_features(hf: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Z before the projector, exactly as LlavaModel.get_image_features selects it."""
    cfg = hf.config
    hidden = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    return hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden


class HFEager(System):
    source = "hf"

    def llm_modules(self):
        lm = self.model.model.language_model
        return [lm.layers, lm.norm, self.model.lm_head, self.model.model.multi_modal_projector]

    def tower(self):
        return self.model.model.vision_tower

    def prefill(self):
        s = self._next()
        return _hf_prefill(self.model, s.hf_ids, s.features, None, use_cache=True).logits

    def ttft(self):
        s = self._next()
        out = self.model(input_ids=s.hf_ids, pixel_values=s.pixels, use_cache=True, logits_to_keep=1)
        return out.logits.argmax(-1)

    def start_decode(self):
        s = self.sets[0]
        self.cache = _hf_prefill(self.model, s.hf_ids, s.features, None, use_cache=True).past_key_values

    def decode_step(self):
        s = self._next()
        out = self.model(input_ids=s.next_token, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        token = out.logits.argmax(-1)
        self.cache.crop(-1)  # back to the prefilled context (a negative count is accepted by 5.17 and later)
        return token

    def release(self):
        super().release()
        self.cache = None


# transformers' masking_utils skips the causal mask (SDPA is_causal=True) only when not tracing, and counts a
# capturing CUDA stream or dynamo as tracing: the graphed / compiled HF prefill attends through an explicit mask.
MASK_NOTE = ("transformers builds an explicit causal mask while capturing or compiling (masking_utils.is_tracing), "
             "where eager uses SDPA is_causal=True: attention is ~2.5% of the FLOPs at t=64")


class HFFast(HFEager):
    """HF LLaVA prefill (projector + splice + LM + lm_head) replayed as one CUDA graph, or torch.compile(mode=
    "reduce-overhead"). Methods are tried in order; `method` records the one that worked, `note` why others failed.
    The splice uses a mask computed once (HF's per-call placeholder check synchronises, which a graph cannot)."""

    decodes = False

    def __init__(self, name, model, arch, methods=("cuda_graph", "cuda_graph_nocache", "compile")):
        super().__init__(name, model, arch)
        self.methods = list(methods)
        self.variant = methods[0].removesuffix("_nocache")
        self.method = "none"
        self.compile_s: float | None = None
        self.failures: list[str] = []

    def prepare(self, batch, t, sets):
        super().prepare(batch, t, sets)
        s = sets[0]
        self.static = s.features.clone()
        mask = (s.hf_ids == self.model.config.image_token_id).unsqueeze(-1)
        while self.methods:
            method = self.methods[0]
            try:
                self._run = self._build(method, s.hf_ids, mask)
                self.method = method
                break
            except Exception as err:  # noqa: BLE001 - recorded; a method that failed once is not tried again
                self.failures.append(f"{method} failed: {type(err).__name__}: {str(err)[:200]}")
                self.methods.pop(0)
                free_memory(self.static.device)
        self.note = "; ".join([MASK_NOTE, *self.failures])
        if not self.methods:
            raise RuntimeError("; ".join(self.failures))

    def _build(self, method: str, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        hf, static = self.model, self.static
        if method in ("cuda_graph", "cuda_graph_nocache"):
            use_cache = method == "cuda_graph"
            graph, out = capture_graph(lambda: _hf_prefill(hf, ids, static, mask, use_cache).logits)

            def replay(features):
                static.copy_(features)
                graph.replay()
                return out

            self._graph = graph
            return replay
        if method == "compile":
            # Default dynamic=None: the second shape recompiles once with dynamic sizes, later shapes reuse it.
            compiled = torch.compile(lambda f: _hf_prefill(hf, ids, f, mask, False).logits, mode="reduce-overhead")

            def call(features):
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(features)

            t0 = time.perf_counter()
            for _ in range(3):  # compile, record, then replay: all outside the timed region
                call(static)
            torch.cuda.synchronize()
            self.compile_s = round(time.perf_counter() - t0, 1)
            return call
        raise ValueError(f"unknown method {method!r}")

    def prefill(self):
        return self._run(self._next().features)

    def ttft(self):
        # The graphed splice hit a device-side masked_scatter size assert in TTFT on the H100 (2026-11-21 run),
        # which poisons the CUDA context for every later entry; TTFT of HF LLaVA is measured eagerly instead.
        raise NotImplementedError("hf_llava graphs: TTFT not measured (see hf_llava eager)")

    def info(self):
        return {**super().info(), "compile_s": self.compile_s}

    def release(self):
        super().release()
        self._run = self._graph = self.static = None


def _graphs_available() -> str | None:
    try:
        import saisa.model.graphs  # noqa: F401
    except ImportError as err:
        return f"saisa.model.graphs is not importable: {err}"
    return None


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if is_cuda(device) else 0


def make_systems(setting: Setting, device: torch.device, wanted: tuple[str, ...], compile_hf: bool,
                 saisa_attention: str = "auto", saisa_schedule: str = AUTO):
    """HF LLaVA, our architectures over its weights, and the systems that run them: (systems, skipped, hf, ours).

    `*_opt` and `*_graphs` run a second model object over the same weights after `optimize_for_inference()`, so
    inference-only state (folded weights, side streams) stays off the plain eager models. saisa_schedule: a
    SAISA_SCHEDULES name, or "auto" (saisa_graphs picks per shape; saisa_opt runs "serial").
    """
    if saisa_schedule not in (AUTO, *SAISA_SCHEDULES):
        raise ValueError(f"unknown saisa schedule {saisa_schedule!r}; choose from {(AUTO, *SAISA_SCHEDULES)}")
    base = "serial" if saisa_schedule == AUTO else saisa_schedule
    hf = build_hf_llava(setting, device)
    ours = {arch: build_ours(setting, arch, device, donor=hf) for arch in ("saisa", "naavit", "llava")}
    systems: dict[str, System] = {arch: OursEager(arch, ours[arch], arch) for arch in ours}
    systems["hf_llava"] = HFEager("hf_llava", hf, "llava")
    skipped: dict[str, str] = {}
    optimized: dict[str, tuple[nn.Module, int]] = {}

    def optimized_model(arch: str) -> tuple[nn.Module, int]:
        if arch not in optimized:
            model = build_ours(setting, arch, device, donor=ours[arch], borrow_projector=True)
            before = _allocated(device)
            if hasattr(model, "optimize_for_inference"):
                # The graphed saisa engine runs the compiled per-layer functions (fused.py); llava has no fast path.
                model.optimize_for_inference(compile=is_cuda(device), dynamic=False, attention=saisa_attention,
                                             **SAISA_SCHEDULES[base])
            optimized[arch] = (model, _allocated(device) - before)
        return optimized[arch]

    def add(system: System, extra_bytes: int = 0, note: str = "") -> None:
        system.extra_bytes, system.note = extra_bytes, note
        systems[system.name] = system

    if "saisa_opt" in wanted:
        model, extra = optimized_model("saisa")
        add(OursEager("saisa_opt", model, "saisa"), extra, "eager forward after optimize_for_inference()")
    if not is_cuda(device):
        skipped.update({n: "needs CUDA" for n in ("hf_llava_graphs", "saisa_graphs", "llava_graphs")})
    else:
        add(HFFast("hf_llava_graphs", hf, "llava"))
        if compile_hf:
            add(HFFast("hf_llava_compile", hf, "llava", methods=("compile",)))
        missing = _graphs_available()
        for arch in ("saisa", "llava"):
            name = f"{arch}_graphs"
            if missing:
                skipped[name] = missing
            elif name in wanted:
                model, extra = optimized_model(arch)
                saisa = arch == "saisa"
                schedule = ("each shape's fastest of " + ", ".join(SAISA_SCHEDULES) if saisa_schedule == AUTO
                            else saisa_schedule)
                add(OursGraphed(name, model, arch, saisa_schedule if saisa else None, base), extra,
                    "saisa.model.graphs.GraphedForward after optimize_for_inference(); keeps no KV cache"
                    + (f"; attention={model._fused.attention if model._fused else saisa_attention} "
                       f"(fused.ATTENTION), step={model._fused.step if model._fused else None}, "
                       f"pdl={model._fused.pdl if model._fused else None}, "
                       f"tiled weights={model._fused.skinny_layers is not None if model._fused else None}; "
                       f"prefill schedule: {schedule} "
                       "(SAISA_SCHEDULES; each entry records its own)" if saisa else ""))
    keep = {n: sys for n, sys in systems.items() if n in wanted or n == "hf_llava_compile"}
    return keep, {n: why for n, why in skipped.items() if n in wanted}, hf, ours
