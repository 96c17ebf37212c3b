"""longcat_lab: a readable, scaled-down LongCat-Flash to learn and research on."""

from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LatentCache, LongCatLM, Routing

__all__ = ["ModelConfig", "LongCatLM", "LatentCache", "Routing", "presets"]
__version__ = "0.1.0"
