"""Decoding-only machinery: the MLA latent KV cache and the rearranged decoding weights (`cache`), the no-gradient
branches the model's forward takes when decoding (`decode`), and token generation (`generate`)."""

from longcat_lab.inference.cache import DecodingWeights, LatentCache
from longcat_lab.inference.generate import generate, sample_next, stream

__all__ = ["DecodingWeights", "LatentCache", "generate", "sample_next", "stream"]
