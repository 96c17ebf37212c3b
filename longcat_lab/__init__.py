"""longcat_lab: a readable, scaled-down LongCat-Flash to learn and research on."""

from longcat_lab._version import __version__
from longcat_lab.model import CausalLMOutput, LatentCache, LongCatLM, ModelConfig, Routing, presets

__all__ = ["CausalLMOutput", "ModelConfig", "LongCatLM", "LatentCache", "Routing", "presets", "__version__"]
