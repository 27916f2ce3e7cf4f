"""SaisaForConditionalGeneration: vision tower -> projector -> a Llama-family LLM, as saisa, naavit or llava.

Unusual here: one token stream per architecture, driven layer by layer over the HF backbone's own modules.
- saisa: queries are text only; layer i's visual keys/values come from V_i = MLP_i(Z) (all layers computed up front,
  before any text), through layer i's input norm, k_proj/v_proj and RoPE; visual tokens never reach an FFN.
- naavit: queries are text only; visual hidden states start as one embedding-space projection, are never updated by
  attention, but pass through every layer's FFN (paper Table 1 pilot).
- llava: visual and text tokens are all queries (plain LLaVA-1.5).
`input_ids` hold ONE `image_token_id` per image; `logits` has one row per `input_ids` position and rows at
placeholders carry no meaning (never in the loss). See naavit.py for how positions and the mask are built.
In training with labels the loss skips the logits (loss.py) and `logits` is None, as in fused-loss trainers.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from saisa.config import SaisaConfig

from . import skinny, text_attention
from .cache import SaisaCache
from .decoder import attention_block, check_decoder, feed_forward, query_key_value
from .fused import (
    ATTENTION,
    FFN,
    STEP,
    TextLayer,
    placed_final_norm,
    projector_hidden,
    skinny_first_inputs,
    skinny_layer_step,
    skinny_supported,
    supports_fused,
    text_layer_step,
    text_layer_tensors,
    tiled_text_layer,
    visual_inputs_chunk,
    visual_rows_chunk,
)
from .loss import fusable, linear_cross_entropy, logits_cross_entropy, shifted_targets
from .naavit import SequenceLayout, build_layout, naavit_mask
from .projector import LayerProjectors, MultiModalProjector, StackedLinear
from .vision import (
    build_vision_tower,
    num_visual_tokens,
    select_image_features,
    vision_feature_dim,
)
from .visual_kv import (
    Chunks,
    FoldedKV,
    _place,
    chunk_slices,
    fold_kv_weights,
    projector_weights,
    saisa_visual_inputs,
    saisa_visual_kv,
)


def _column_index(cols: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cols (B, T) as a gather/scatter index over x's (B, *, h) rows."""
    return cols.unsqueeze(-1).expand(-1, -1, x.shape[-1])


def _columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The rows `cols` (B, T) of x (B, L, h): (B, T, h)."""
    return x.gather(1, _column_index(cols, x))


# Final norms whose function is fused.rms_norm (fp32 normalise, cast, times the weight): the compiled prefill's
# `finish` applies it; any other keeps the model's own module.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")

# A projector activation (config.projector_hidden_act) -> its form in the compiled visual step (fused.GELU); the
# compiled path serves only these.
PROJECTOR_GELU = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


@dataclass
class FusedPath:
    """Compiled pure functions of fused.py and each layer's tensors (see optimize_for_inference)."""

    text: Callable
    visual: Callable
    layers: list[TextLayer]
    attention: str = "eager"  # the form of attention (fused.ATTENTION), where the tensors allow it
    rope_half: bool = False  # the RoPE tables repeat their first half (text_attention reads that half only)
    ffn: str = "aten"  # the FFN's first half (fused.FFN), where the rows allow it
    step: str = "compiled"  # a text layer's form (fused.STEP); "skinny" where fused.skinny_supported, else compiled
    chunks: Chunks = None  # layers per visual chunk (visual_kv.chunk_slices)
    tables: dict = field(default_factory=dict)  # layout -> _prefill_tables' tensors, while the layout lives
    pdl: bool = False  # the skinny step's kernels as programmatic dependent launches (fused.skinny_layer_step)
    first: Callable | None = None  # compiled fused.skinny_first_inputs
    finish: Callable | None = None  # compiled fused.placed_final_norm; None: the model's own final norm
    norm: tuple | None = None  # (weight, eps) of the final RMSNorm, for `finish`
    rows: Callable | None = None  # fused.visual_rows_chunk with compiled parts (per-layer MLPs with a linear_2 bias)
    kv_bias: torch.Tensor | None = None  # (n, 2k) fp32: each layer's folded W_kv times its MLP's linear_2 bias
    b2: torch.Tensor | None = None  # (n, h): the MLPs' linear_2 biases, for the rows' 1 / RMS (_skinny_layers)
    rstd_stream: torch.cuda.Stream | None = None  # low priority: where the rows' 1 / RMS is made (_skinny_layers)
    skinny_layers: list[TextLayer] | None = None  # the skinny step's tensors, weights tiled (None: `layers`)


class SaisaPreTrainedModel(PreTrainedModel):
    config_class = SaisaConfig
    base_model_prefix = "saisa"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, StackedLinear):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class SaisaForConditionalGeneration(SaisaPreTrainedModel, GenerationMixin):
    def __init__(self, config: SaisaConfig) -> None:
        super().__init__(config)
        config.validate_saisa()
        text = config.text_config
        self.vision_tower = build_vision_tower(config.vision_config)  # frozen by default in both training stages
        self.language_model = AutoModelForCausalLM.from_config(text)
        check_decoder(self.language_model)
        d, h = vision_feature_dim(config.vision_config, config.vision_feature_layer), text.hidden_size
        if config.architecture == "saisa":
            self.multi_modal_projector = LayerProjectors(
                config.num_projector_layers, text.num_hidden_layers, d, h, config.projector_type,
                config.projector_hidden_act,
            )
        else:
            self.multi_modal_projector = MultiModalProjector(d, h, config.projector_type, config.projector_hidden_act)
        self.num_visual_tokens = num_visual_tokens(
            config.vision_config, config.vision_feature_select_strategy, config.vision_feature_layer
        )
        self.gradient_checkpointing = False
        # Training, per-layer projectors (stage 2): all layers' visual K/V in one autograd Function with its own
        # backward (visual_grad.py), which keeps Z, the pre-RoPE K/V and the RMS scales instead of the visual
        # path's activations and recomputes the MLPs. Off: autograd keeps every layer's visual activations.
        self.fused_visual_kv = True
        # Training, per-layer projectors: recompute each layer's visual K/V under its own checkpoint (visual_kv.py);
        # slower than fused_visual_kv, which it overrides; for what that does not cover (LoRA on k/v, Qwen3).
        self.visual_recompute = False
        # Inference-only speed-ups of the saisa visual path (visual_kv.py); none changes the function computed.
        self._folded_kv: FoldedKV | None = None
        self._visual_stream: torch.cuda.Stream | None = None
        self.visual_kv_chunk: int | None = None  # layers per batched chunk; None = all layers at once
        self._fused: FusedPath | None = None
        self.post_init()

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        self.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def optimize_for_inference(
        self,
        fold: bool = True,
        chunk: Chunks = None,
        overlap: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        dynamic: bool | None = False,
        attention: str = "auto",
        compile_mode: str | None = None,
        ffn: str = "auto",
        compile_options: dict | None = None,
        step: str = "auto",
        pdl: bool | str = "auto",
        gelu: str = "auto",
        tile: bool | str = "auto",
    ) -> None:
        """Speed up the saisa prefill without changing its function (inference only; `train()` undoes it).

        fold: stack every layer's visual k/v projection with its input-norm weight folded in (costs 2·n·h·k
        weights of memory). chunk, overlap: the prefill schedule (`set_prefill_schedule`); the default, all layers'
        visual inputs in one batched step on one stream before the first text layer, was the fastest CUDA graph at
        t=64 on an H100 (8.97 ms against 9.26 with chunk=1 and overlap, in interleaved rounds of
        scripts/profile_prefill.py: benchmarks/results/profile-prefill-h100-t64.json).
        compile: run the text layers and visual chunks through `torch.compile`d pure functions (fused.py), traced
        once for all layers: the visual chunks stop at each layer's normalised inputs, and each text layer projects
        them with its text rows in one GEMM with the folded k/v weights (so `compile` implies `fold`); prefill
        without a cache only. dynamic: passed to torch.compile (False: one compile per shape, whose kernels index
        without 64-bit divisions; with dynamic shapes the visual RoPE kernel ran 10x under bandwidth on an H100).
        attention: the compiled text layers' form of attention (fused.ATTENTION): "triton", text_attention's
        kernels (RoPE, scores, softmax and values over spans of the keys, then a merge), wherever the tensors allow
        it on CUDA, else "eager"; or a form of fused.attend ("eager", "sdpa", "flex"; at batch 1 SDPA took 20 us per
        layer and the eager form 13 on an H100, profile-prefill-h100-t64.json's pieces). "auto": "triton" for a
        model on CUDA where Triton is installed, else "eager".
        compile_mode: passed to torch.compile with the inductor backend (e.g. "max-autotune-no-cudagraphs": Triton
        GEMMs tuned against cuBLAS; minutes of compile). compile_options: inductor options for torch.compile,
        not with compile_mode; None: on CUDA with inductor {"combo_kernels": True} (a layer's independent
        elementwise kernels, such as the q and k RoPEs, launched as one), else none.
        ffn: the compiled text layers' FFN first half (fused.FFN): "triton" runs SiLU(x W_g) * (x W_u) as one
        kernel (skinny.gate_up) wherever a forward has at most skinny.MAX_ROWS text rows on CUDA, "aten" never;
        "auto": "triton" for a model on CUDA where Triton is installed.
        step: the form of a text layer (fused.STEP): "compiled", text_layer_step under torch.compile; "skinny",
        fused.skinny_layer_step, 7 kernels a layer instead of 10 and none of them a norm, where its kernels serve
        the rows (at most skinny.MAX_ROWS text rows, no q/k/v bias; needs attention and ffn "triton"); for one
        sample with one image and per-layer MLPs with a linear_2 bias it also reads the visual rows before that bias
        and the norm (fused.visual_rows_chunk: 8.223 against 8.253 ms at t=64 on an H100,
        benchmarks/results/prefill-ab-h100/). "auto":
        "skinny" where its kernels can be launched as programmatic dependents (pdl), else "compiled". Launched in
        turn the two measured the same (skinny 8.531, compiled 8.526 ms at t=64 on an H100 in interleaved rounds,
        profile-prefill-h100-t64-skinny.json: the norms' kernels saved are spent again by the Triton GEMMs); with
        pdl the skinny step took 8.251 against 8.388 ms compiled and 8.421 skinny launched in turn
        (profile-prefill-h100-t64-pdl.json).
        pdl: the skinny step's kernels launched as programmatic dependents, each overlapping the end of the one
        before (fused.skinny_layer_step; needs step "skinny" and skinny.pdl_supported: Hopper or later). "auto":
        wherever the step is "skinny" and the GPU allows it.
        gelu: the projector MLPs' GELU in the compiled visual step (fused.GELU, fused.visual_inputs_chunk): "auto",
        the projector's own activation ("gelu": the erf form; "gelu_pytorch_tanh" / "gelu_new": the tanh form, in
        the first GEMM's epilogue on CUDA; any other activation keeps the reference path); "tanh": the tanh form
        for an erf-GELU projector too, an approximation (below bf16 rounding) that saves a pass over the
        activations.
        tile: the skinny step reads copies of q/o_proj, gate/up_proj and down_proj's weights laid out in the order
        its kernels read them (skinny.tile: each program's block at each K step one contiguous piece of memory);
        costs one more copy of those weights (about 10.8 GB at Vicuna-7B's shapes). "auto": where the step is
        "skinny".
        """
        if tile not in (True, False, "auto"):
            raise ValueError(f"tile must be True, False or 'auto', got {tile!r}")
        if attention not in ("auto", *ATTENTION):
            raise ValueError(f"unknown attention {attention!r}; choose from {('auto', *ATTENTION)}")
        if ffn not in ("auto", *FFN):
            raise ValueError(f"unknown ffn {ffn!r}; choose from {('auto', *FFN)}")
        on_cuda = self.get_input_embeddings().weight.is_cuda
        if ffn == "auto":
            ffn = "triton" if on_cuda and skinny.available() else "aten"
        if attention == "auto":
            attention = "triton" if on_cuda and skinny.available() else "eager"
        if step not in ("auto", *STEP):
            raise ValueError(f"unknown step {step!r}; choose from {('auto', *STEP)}")
        if pdl not in (True, False, "auto"):
            raise ValueError(f"pdl must be True, False or 'auto', got {pdl!r}")
        pdl_ok = on_cuda and skinny.pdl_supported(self.get_input_embeddings().weight.device)
        if step == "auto":
            step = "skinny" if pdl_ok and pdl is not False and attention == ffn == "triton" else "compiled"
        elif step == "skinny" and not attention == ffn == "triton":
            raise ValueError(f"step='skinny' runs text_attention's and skinny's kernels: it needs attention and ffn "
                             f"'triton' (got {attention!r}, {ffn!r})")
        if gelu not in ("auto", "tanh"):
            raise ValueError(f"unknown gelu {gelu!r}; choose from ('auto', 'tanh')")
        own_gelu = ("exact" if self.config.projector_type == "linear"  # no activation at all
                    else PROJECTOR_GELU.get(self.config.projector_hidden_act))
        if gelu == "auto":
            gelu = own_gelu
        if pdl == "auto":
            pdl = step == "skinny" and pdl_ok
        if pdl and step != "skinny":
            raise ValueError(f"pdl=True launches the skinny step's kernels: it needs step='skinny' (got {step!r})")
        if tile == "auto":
            tile = step == "skinny"
        if tile and step != "skinny":
            raise ValueError(f"tile=True lays weights out for the skinny step's kernels: it needs step='skinny' "
                             f"(got {step!r})")
        if pdl and on_cuda and not pdl_ok:
            raise ValueError("pdl=True needs a Hopper or later GPU and a Triton with griddepcontrol "
                             "(skinny.pdl_supported)")
        if compile_options is None and compile_backend == "inductor" and compile_mode is None and on_cuda:
            compile_options = {"combo_kernels": True}  # 8.54 vs 8.63 ms at t=64 (profile-prefill-h100-t64-combo.json)
        if self.config.architecture != "saisa":
            return
        if any(getattr(layer.self_attn, "k_norm", None) is not None for layer in self.layers):
            fold = compile = False  # Qwen3's per-head k norm follows k_proj: nothing to fold into it
        chunk_slices(len(self.layers), chunk)  # a bad schedule fails before minutes of compile
        self._folded_kv = fold_kv_weights(self.layers) if fold or compile else None
        self._fused = None
        if compile and own_gelu is not None and all(supports_fused(layer) for layer in self.layers):
            from torch._dynamo import config as dynamo_config

            # One entry per (batch, length) shape with dynamic=False; the default limit (8) would silently fall
            # back to eager on a serving mix of shapes.
            dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
            folded = self._folded_kv
            options = {"dynamic": dynamic, "backend": compile_backend}
            if compile_mode is not None:
                options["mode"] = compile_mode
            if compile_options:
                options["options"] = dict(compile_options)
            self._fused = FusedPath(
                text=torch.compile(text_layer_step, **options),
                visual=torch.compile(functools.partial(visual_inputs_chunk, gelu=gelu), **options),
                layers=[
                    text_layer_tensors(layer, folded.weight[i], None if folded.bias is None else folded.bias[i])
                    for i, layer in enumerate(self.layers)
                ],
                attention=attention,
                ffn=ffn,
                step=step,
                rope_half=self._rope_halves_equal(),
                pdl=pdl,
                first=torch.compile(skinny_first_inputs, **options),
            )
            if tile and on_cuda:
                tiled = [tiled_text_layer(w) for w in self._fused.layers]
                self._fused.skinny_layers = tiled if all(w is not None for w in tiled) else None
            proj = self.multi_modal_projector
            w2, b2 = projector_weights(proj, slice(0, len(self.layers)))[2:]
            if step == "skinny" and proj.num_mlps == len(self.layers) > 1 and w2 is not None and b2 is not None:
                # The skinny step reads the visual rows before linear_2's bias and the norm (fused.visual_rows_chunk).
                self._fused.rows = functools.partial(
                    visual_rows_chunk, hidden=torch.compile(functools.partial(projector_hidden, gelu=gelu), **options),
                    row_rstd=None)  # made per layer beside its k/v GEMM (_skinny_layers)
                self._fused.b2 = b2
                device = self.get_input_embeddings().weight.device
                self._fused.rstd_stream = torch.cuda.Stream(device, priority=0) if device.type == "cuda" else None
                self._fused.kv_bias = torch.stack([wkv.float() @ b.float() for wkv, b in zip(folded.weight, b2)])
            norm = self.language_model.model.norm
            if type(norm).__name__ in RMS_NORMS:  # transformers' Llama-form RMSNorm: weight * normalised
                self._fused.finish = torch.compile(placed_final_norm, **options)
                self._fused.norm = (norm.weight, norm.variance_epsilon)
        self.set_prefill_schedule(chunk, overlap)

    def _rope_halves_equal(self) -> bool:
        """Whether the language model's RoPE tables repeat their first half (transformers' Llama family does)."""
        emb = self.get_input_embeddings().weight
        positions = torch.arange(4096, device=emb.device)[None]
        cos, sin = self.language_model.model.rotary_emb(emb[:1, None], positions)
        return text_attention.halves_equal(cos, sin)

    def set_prefill_schedule(self, chunk: Chunks = None, overlap: bool = False) -> None:
        """Order the saisa prefill's visual work, after `optimize_for_inference`, without folding or compiling again
        (a chunk size not seen before compiles the visual step once for its shape).

        chunk: layers per batched visual step (visual_kv.chunk_slices): None, all layers at once (2 bmm's for the
        projector MLPs of all n layers); an int, chunks of that many; a tuple, the first chunks' sizes, then the rest
        in one (compiled path only; the uncompiled path then takes all layers at once). overlap: on CUDA, run the
        chunks on a side stream, each text layer waiting for its own chunk, so later chunks can run beside the first
        text layers. The visual GEMMs are compute-bound and the text GEMMs memory-bound, but each kernel fills the
        SMs, so running them together slows both nearly as much as it overlaps them (scripts/profile_prefill.py).
        """
        chunk_slices(len(self.layers), chunk)
        self.visual_kv_chunk = chunk if chunk is None or isinstance(chunk, int) else None
        if self._fused is not None:
            self._fused.chunks = chunk
        device = self.get_input_embeddings().weight.device
        self._visual_stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def train(self, mode: bool = True):
        if mode:  # folded weights would go stale as soon as the weights move
            self._folded_kv, self._visual_stream, self._fused = None, None, None
        return super().train(mode)

    # ------------------------------------------------------------------ images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features Z (num_images, v, d) from pixel_values (num_images, C, H, W)."""
        vc = self.config.vision_config
        channels = getattr(vc, "num_channels", 3)
        size = getattr(vc, "image_size", None)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels or (
            size is not None and tuple(pixel_values.shape[2:]) != (size, size)
        ):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (num_images, {channels}, {size}, "
                f"{size}) for this vision tower: preprocess images with the model's image processor"
            )
        tower_dtype = next(self.vision_tower.parameters()).dtype
        return select_image_features(
            self.vision_tower, pixel_values.to(tower_dtype), self.config.vision_feature_layer,
            self.config.vision_feature_select_strategy,
        )

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        """V = P(Z): (n_layers, N, v, h) for saisa (a broadcast view when shared), (N, v, h) for llava/naavit."""
        dtype = self.get_input_embeddings().weight.dtype
        return self.multi_modal_projector(features.to(dtype))

    def expand_shared_projector(self) -> None:
        """Stage 1 -> stage 2: replicate the shared MLP into one MLP per layer (outputs unchanged)."""
        if self.config.architecture != "saisa":
            raise ValueError(f"expand_shared_projector applies to architecture='saisa', not {self.config.architecture!r}")
        self.multi_modal_projector.expand()
        self.config.projector_sharing = "per_layer"

    def generate(self, *args, **kwargs):
        """Greedy / sampled decoding over SaisaCache (saisa.generate), taking transformers' generate arguments."""
        from saisa.generate import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        past_key_values: SaisaCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        skip_logits: bool | None = None,
        layout: SequenceLayout | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, L) with one image_token_id per image; pixel_values (N, C, H, W) or precomputed
        image_features Z (N, v, d); attention_mask (B, L) (or (B, past + L) with a cache); labels (B, L).

        skip_logits: return no logits (None) and compute the loss chunk by chunk through the lm_head
        (loss.linear_cross_entropy) without the (B, L, vocab) logits; needs labels. Default: in training with labels.
        An lm_head the chunked loss cannot read (an adapter, ZeRO-3 partitioned) takes the logits path.
        layout: the batch's positions, built beforehand by `self.layout` (e.g. from host copies of input_ids and
        attention_mask, so that a CUDA graph captures no host synchronisation); default: built here.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes only the loss: pass labels")
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask[:, -length:]
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        num_images = 0 if image_features is None else image_features.shape[0]
        if use_cache and past_key_values is None:
            past_key_values = SaisaCache(len(self.layers))
        v = self.num_visual_tokens if image_features is None else image_features.shape[1]
        if layout is None:
            layout = self.layout(input_ids, attention_mask, num_images, v, past_key_values)
        elif layout.text_pos.shape != input_ids.shape:
            raise ValueError(f"the layout given is for input_ids of shape {tuple(layout.text_pos.shape)}, these are "
                             f"{tuple(input_ids.shape)}; build it with model.layout(input_ids, attention_mask, ...)")
        lm_head = self.language_model.lm_head
        if skip_logits and not logits_to_keep and fusable(lm_head):
            hidden = self.hidden_states_with_layout(input_ids, layout, image_features, past_key_values)
            loss = linear_cross_entropy(hidden[:, :-1], lm_head, shifted_targets(labels, layout))
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=past_key_values)
        logits = self.forward_with_layout(input_ids, layout, image_features, past_key_values, logits_to_keep)
        loss = None
        if labels is not None:
            loss = logits_cross_entropy(logits, shifted_targets(labels, layout))
        return CausalLMOutputWithPast(loss=loss, logits=None if skip_logits else logits,
                                      past_key_values=past_key_values)

    def layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_images: int,
        v: int | None = None,
        cache: SaisaCache | None = None,
    ) -> SequenceLayout:
        """Positions of every token and image (naavit.py), checked against the number of images given.

        Built where input_ids live (CPU ids let a meta-device model be FLOP-counted, and keep host syncs out of a
        CUDA graph), then moved to the model's device.
        """
        start = cache.next_pos.to(input_ids.device) if cache is not None and cache.next_pos is not None else None
        v = self.num_visual_tokens if v is None else v
        layout = build_layout(input_ids, attention_mask, self.config.image_token_id, v, num_images, start)
        device = self.get_input_embeddings().weight.device
        return layout if layout.text_pos.device == device else layout.to(device)

    def forward_with_layout(
        self,
        input_ids: torch.Tensor,
        layout: SequenceLayout,
        image_features: torch.Tensor | None = None,
        cache: SaisaCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, L or logits_to_keep, vocab) for a precomputed layout: no host synchronisation inside."""
        hidden = self.hidden_states_with_layout(input_ids, layout, image_features, cache, logits_to_keep)
        return self._lm_head(hidden)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head; after optimize_for_inference chose the skinny step, as skinny.linear wherever it serves the
        rows without autograd (at most skinny.MAX_ROWS, e.g. a prefill's last position: Vicuna-7B's 262 MB head
        in 90.9 against 97.8 us for cuBLAS's kernel on an H100, benchmarks/results/tiled-weights-h100.json), a
        programmatic dependent launch with the step's pdl."""
        head, fused = self.language_model.lm_head, self._fused
        if (fused is not None and fused.step == "skinny" and not torch.is_grad_enabled() and type(head) is nn.Linear
                and head.bias is None and skinny.supported(hidden, head.weight, tiles=skinny.RESIDUAL)):
            tiles = skinny.RESIDUAL._replace(prefetch=skinny.PREFETCH if fused.pdl else 0)
            return skinny.linear(hidden, head.weight, tiles, pdl=fused.pdl)
        return head(hidden)

    def hidden_states_with_layout(
        self,
        input_ids: torch.Tensor,
        layout: SequenceLayout,
        image_features: torch.Tensor | None = None,
        cache: SaisaCache | None = None,
        keep: int = 0,
    ) -> torch.Tensor:
        """The LLM's final-norm hidden states (B, L or `keep`, h), the lm_head's input."""
        lm = self.language_model.model
        input_ids = input_ids.to(layout.text_pos.device)
        text_h = lm.embed_tokens(input_ids.masked_fill(layout.is_placeholder, 0))  # (B, L, h)
        if image_features is not None and image_features.shape[0] == 0:
            image_features = None
        if image_features is not None:
            image_features = image_features.to(text_h.dtype)
        if self._fused is not None and image_features is not None and cache is None and not self.training:
            hidden = self._decode_fused(text_h, image_features, layout, keep)
            if self._fused.finish is not None:  # already through the final norm
                return hidden
        else:
            hidden = self._decode(text_h, image_features, layout, cache)  # (B, L, h)
        return lm.norm(hidden if not keep else hidden[:, -keep:])

    def _decode(
        self, text_h: torch.Tensor, features: torch.Tensor | None, layout: SequenceLayout, cache: SaisaCache | None
    ) -> torch.Tensor:
        arch = self.config.architecture
        v = None if features is None else features.shape[1]
        mask, cos, sin, vis_cos, vis_sin = self._mask_and_rope(text_h, layout, v, cache)
        n_vis = 0 if vis_cos is None else vis_cos.shape[1]
        llava = arch == "llava"

        vis_h = None
        vis_kv: list | None = None
        events: list = []
        if features is not None and arch == "saisa":
            # Visual work does not depend on text: every layer's visual K/V is computed up front (paper Eq. 6-7).
            stream = self._visual_stream if text_h.is_cuda and not torch.is_grad_enabled() else None
            folded = self._folded_kv if not self.training else None
            training = self.training and torch.is_grad_enabled()
            vis_kv, events = saisa_visual_kv(
                self.layers, self.multi_modal_projector, features, layout, vis_cos, vis_sin,
                folded=folded, chunk=self.visual_kv_chunk, stream=stream,
                recompute=self.visual_recompute and training, function=self.fused_visual_kv and training,
            )
        elif features is not None:
            vis_h = _place(self.project_images(features).unsqueeze(0), layout)[0]  # (B, Sv, h)
            if llava:
                text_h = torch.cat([vis_h, text_h], dim=1)
                cos, sin = torch.cat([vis_cos, cos], dim=1), torch.cat([vis_sin, sin], dim=1)
                vis_h = None

        hidden = text_h
        for i, layer in enumerate(self.layers):
            if events and events[i] is not None:
                torch.cuda.current_stream().wait_event(events[i])
            layer_kv = None
            if vis_kv:  # taken out of the list: freed after this layer (attention keeps its own [visual; text] copy)
                layer_kv, vis_kv[i] = vis_kv[i], None
            step = (layer, hidden, vis_h, layer_kv, cos, sin, vis_cos, vis_sin, mask, cache, i)
            if self.gradient_checkpointing and self.training:
                hidden, vis_h = checkpoint(self._layer, *step, use_reentrant=False)
            else:
                hidden, vis_h = self._layer(*step)
        return hidden[:, n_vis:] if llava else hidden

    def _mask_and_rope(self, text_h: torch.Tensor, layout: SequenceLayout, v: int | None, cache: SaisaCache | None
                       ) -> tuple:
        """What a forward needs from the layout alone (v: visual tokens per image, None without images): the NAAViT
        mask (B, 1, T, S) over [visual; text] keys (for llava every token a query), the text rows' RoPE tables and
        the visual ones (None without images). With a cache, the new keys' positions are appended to it."""
        lm = self.language_model.model
        past = cache.get_seq_length() if cache is not None else 0
        text_pos = layout.text_pos
        if v is not None:
            vis_pos, vis_valid = layout.visual_positions(v)
        else:
            vis_pos, vis_valid = text_pos[:, :0], layout.text_is_key[:, :0]
        n_vis = vis_pos.shape[1]
        new_key_pos = torch.cat([vis_pos, text_pos], dim=1)
        new_key_valid = torch.cat([vis_valid, layout.text_is_key], dim=1)
        if cache is not None:
            key_pos = new_key_pos if past == 0 else torch.cat([cache.key_pos, new_key_pos], dim=1)
            key_valid = new_key_valid if past == 0 else torch.cat([cache.key_valid, new_key_valid], dim=1)
            cache.append_positions(new_key_pos, new_key_valid, layout.next_pos)
        else:
            key_pos, key_valid = new_key_pos, new_key_valid
        if self.config.architecture == "llava":  # one stream [visual; text]: every token is a query, as in LLaVA
            query_pos = new_key_pos
            self_index = past + torch.arange(n_vis + text_pos.shape[1], device=text_pos.device)
        else:
            query_pos = text_pos
            self_index = past + n_vis + torch.arange(text_pos.shape[1], device=text_pos.device)
        mask = naavit_mask(query_pos, key_pos, key_valid, self_index)
        cos, sin = lm.rotary_emb(text_h, text_pos)
        vis_cos = vis_sin = None
        if v is not None:
            vis_cos, vis_sin = lm.rotary_emb(text_h, vis_pos)
        return mask, cos, sin, vis_cos, vis_sin

    def _prefill_tables(self, text_h: torch.Tensor, layout: SequenceLayout, v: int) -> tuple:
        """The fused prefill's layout-only tensors: (text columns or None, the keys' RoPE tables (B, Sv + T, D)
        visual then text, the text queries' additive mask (B, 1, T, Sv + T), 0 or -inf). Made outside CUDA-graph
        capture, they are kept as long as their layout object lives, so a graph captured for a fixed layout
        (GraphedForward: warm-up runs first, and it holds the layout) replays none of the ~40 small kernels that make
        them, and reads tensors that live as long as it does. (An earlier cache kept the last four layouts' tables:
        a fifth graph's warm-up freed the first graph's, which then read freed memory.)"""
        key = (id(layout), v, text_h.dtype, text_h.device)
        hit = self._fused.tables.get(key)
        if hit is not None and hit[0]() is layout:
            return hit[1]
        mask, cos, sin, vis_cos, vis_sin = self._mask_and_rope(text_h, layout, v, None)
        cols = layout.text_columns
        if cols is not None:  # drop the placeholder rows: T = text tokens exactly (and the paper's FLOPs)
            n_vis = mask.shape[-1] - text_h.shape[1]
            cos, sin = _columns(cos, cols), _columns(sin, cols)
            key_cols = torch.cat([torch.arange(n_vis, device=cols.device).expand(cols.shape[0], -1), n_vis + cols], 1)
            mask = mask.gather(2, cols[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
            mask = mask.gather(3, key_cols[:, None, None, :].expand(-1, 1, mask.shape[2], -1))
        key_cos, key_sin = torch.cat([vis_cos, cos], dim=1), torch.cat([vis_sin, sin], dim=1)  # (B, Sv + T, D)
        # The float mask SDPA would make from the boolean one in every layer, made once.
        attn_bias = torch.zeros(mask.shape, dtype=text_h.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        tables = (cols, key_cos, key_sin, attn_bias)
        if not (text_h.is_cuda and torch.cuda.is_current_stream_capturing()):  # a graph's pool is not ours to keep
            self._fused.tables[key] = (weakref.ref(layout), tables)
            weakref.finalize(layout, self._fused.tables.pop, key, None)  # the entry goes with its layout
        return tables

    def _decode_fused(self, text_h: torch.Tensor, features: torch.Tensor, layout: SequenceLayout, keep: int = 0
                      ) -> torch.Tensor:
        """saisa inference through the compiled functions: each layer's normalised visual inputs (chunks, optionally
        on a side stream), then per layer ONE k/v GEMM over its visual and text rows, attention and FFN. Returns the
        last `keep` (0: all) positions through the final norm where the compiled `finish` serves it, else all
        positions before it."""
        fused, folded = self._fused, self._folded_kv
        eps, head_dim = folded.eps, folded.head_dim
        cols, key_cos, key_sin, attn_bias = self._prefill_tables(text_h, layout, features.shape[1])
        hidden = text_h
        if cols is not None:
            hidden = _columns(text_h, cols)
        stream = self._visual_stream if text_h.is_cuda else None
        skinny_step = fused.step == "skinny" and skinny_supported(hidden, (fused.skinny_layers or fused.layers)[0],
                                                                  head_dim)
        # One sample with one image: the skinny step reads the visual rows before linear_2's bias and the norm.
        rows = skinny_step and fused.rows is not None and features.shape[0] == 1 == hidden.shape[0] == \
            layout.image_slots.shape[1]
        inputs, events = saisa_visual_inputs(
            len(self.layers), self.multi_modal_projector, features, layout, eps, hidden.shape[1],
            chunk=fused.chunks, stream=stream,
            fn=fused.rows if rows else fused.visual,
        )  # each (B, Sv + T, h), or with `rows` a tuple (that, its visual rows' 1 / RMS (B, Sv))
        if skinny_step:
            hidden = self._skinny_layers(hidden, inputs, events, attn_bias, key_cos, key_sin, eps, head_dim)
        else:
            hidden = self._compiled_layers(hidden, inputs, events, attn_bias, key_cos, key_sin, eps, head_dim)
        # Placeholder rows come back as zeros (their logits carry no meaning).
        index = None if cols is None else _column_index(cols, hidden)
        if fused.finish is not None:
            return fused.finish(hidden, index, text_h.shape[1], keep, *fused.norm)
        return hidden if index is None else text_h.new_zeros(text_h.shape).scatter(1, index, hidden)

    def _compiled_layers(self, hidden, inputs, events, attn_bias, cos, sin, eps, head_dim) -> torch.Tensor:
        """The text layers as the compiled fused.text_layer_step, each waiting for its visual chunk's event."""
        fused = self._fused
        w0 = fused.layers[0]
        ffn = "triton" if fused.ffn == "triton" and skinny.supported(hidden, w0.wg, w0.wu, tiles=skinny.GATE_UP) \
            else "aten"
        attention = fused.attention
        if attention == "triton" and not text_attention.supported(hidden, w0.wkv, head_dim):
            attention = "eager"
        delta = torch.zeros_like(hidden)
        for i, weights in enumerate(fused.layers):
            if events[i] is not None:
                torch.cuda.current_stream().wait_event(events[i])
            hidden, delta = fused.text(hidden, delta, inputs[i], attn_bias, cos, sin, weights, eps, head_dim,
                                       attention, ffn, fused.rope_half)
        return hidden + delta

    def _skinny_layers(self, hidden, inputs, events, attn_bias, cos, sin, eps, head_dim) -> torch.Tensor:
        """The text layers as fused.skinny_layer_step: the first layer's norm inputs made here, each later one's by
        the previous layer's last kernel, which also writes the next layer's k/v input rows (so it waits for that
        layer's visual chunk when it runs on a side stream). With fused.visual_rows_chunk's rows, each layer's
        visual rows' 1 / RMS is made on a low-priority side stream while its k/v GEMM runs (skinny.rows_rstd: a
        few programs, on the SMs the GEMM's 128 tiles leave free on an H100), and attention waits for it: one
        0.058 ms pass over all layers' rows before the first layer less (8.162 against 8.203 ms at t=64 on an
        H100, benchmarks/results/prefill-ab-h100/rstd-beside)."""
        layers, t = self._fused.skinny_layers or self._fused.layers, hidden.shape[1]
        rstd: list = [None] * len(layers)
        if isinstance(inputs[0], tuple):  # fused.visual_rows_chunk's rows, with their 1 / RMS
            inputs, rstd = (list(x) for x in zip(*inputs, strict=True))
        kv_bias = self._fused.kv_bias if rstd[0] is not None else None
        if events[0] is not None:
            torch.cuda.current_stream().wait_event(events[0])
        inputs[0][:, -t:] = hidden
        x_ln, row_sums, sums = self._fused.first(hidden, layers[0].ln1, len(layers))
        beside: list = [None] * len(layers)
        if rstd[0] is not None:  # rstd[i]: (1, Sv) buffers, filled per layer
            side, v = self._fused.rstd_stream, rstd[0].shape[-1]

            def fork(i: int) -> None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    skinny.rows_rstd(inputs[i][0, :v], self._fused.b2[i], eps, out=rstd[i][0])

            def join() -> None:
                torch.cuda.current_stream().wait_stream(side)

            beside = [(functools.partial(fork, i), join) for i in range(len(layers))]
        for i, w in enumerate(layers):
            last = i + 1 == len(layers)
            if not last and events[i + 1] is not None:
                torch.cuda.current_stream().wait_event(events[i + 1])
            hidden, x_ln, row_sums = skinny_layer_step(
                hidden, x_ln, row_sums, sums[i], inputs[i], None if last else inputs[i + 1][:, -t:], attn_bias, cos,
                sin, w,
                None if last else layers[i + 1].ln1, eps, head_dim, self._fused.rope_half, self._fused.pdl,
                vis_rstd=rstd[i], kv_bias=None if kv_bias is None else kv_bias[i], beside=beside[i],
            )
        return hidden

    def _layer(self, layer, hidden, vis_h, vis_kv, cos, sin, vis_cos, vis_sin, mask, cache, index):
        """One decoder layer. hidden: the query stream (text, or [visual; text] for llava)."""
        query, key, value = query_key_value(layer, layer.input_layernorm(hidden), cos, sin)
        if vis_kv is not None:  # saisa: precomputed from V_i
            key, value = torch.cat([vis_kv[0], key], dim=2), torch.cat([vis_kv[1], value], dim=2)
        elif vis_h is not None:  # naavit: visual tokens are keys/values only
            _, vk, vv = query_key_value(layer, layer.input_layernorm(vis_h), vis_cos, vis_sin, with_query=False)
            key, value = torch.cat([vk, key], dim=2), torch.cat([vv, value], dim=2)
            vis_h = feed_forward(layer, vis_h)  # not updated by attention, but through the FFN
        if cache is not None:
            key, value = cache.update(index, key, value)
        hidden = hidden + attention_block(layer, query, key, value, mask)
        return feed_forward(layer, hidden), vis_h
