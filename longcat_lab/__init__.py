"""longcat_lab: a readable, scaled-down LongCat-Flash to learn and research on."""

from . import presets
from .config import ModelConfig
from .model import LatentCache, LongCatLM, Routing

__all__ = ["ModelConfig", "LongCatLM", "LatentCache", "Routing", "presets"]
__version__ = "0.1.0"
