"""saisa: SAISA (arXiv 2502.02458), NAAViT and LLaVA-1.5 multimodal LLMs over Hugging Face backbones.

Importing the package registers `SaisaConfig` with `AutoConfig` and the model with `AutoModelForImageTextToText`.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from saisa.config import SaisaConfig
from saisa.data.processor import SaisaProcessor
from saisa.model.modeling import SaisaForConditionalGeneration

__all__ = ["SaisaConfig", "SaisaForConditionalGeneration", "SaisaProcessor"]
__version__ = "0.1.0"

try:
    AutoConfig.register("saisa", SaisaConfig)
    AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration)
    AutoProcessor.register(SaisaConfig, SaisaProcessor)
except ValueError:  # already registered (module reloaded)
    pass
