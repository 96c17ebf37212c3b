"""The loops that decode with the model: token generation (`generate`), self-speculative decoding with the MTP draft
(`speculative`), int8 weight-only quantisation (`quant`) and torch.compile of the decoding step (`compiled`). The
latent KV cache, the decoding weights and the decoding branches of the forward pass belong to the model
(`longcat_lab.model.cache`, `model.attention`, `model.moe`); `LatentCache` and `DecodingWeights` are re-exported here
for convenience."""

from longcat_lab.inference.generate import generate, sample_next, stream
from longcat_lab.model.cache import DecodingWeights, LatentCache

__all__ = ["DecodingWeights", "LatentCache", "generate", "sample_next", "stream"]
