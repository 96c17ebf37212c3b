"""Export to, and import from, the Hugging Face LongCat-Flash layout (`save_hf`, `load_hf`; docs/design.md §1.6), and
what an export weighs on disk and in the KV cache (`checkpoint_bytes`, `cache_bytes_per_token`). The figures that
draw these numbers live in `longcat_lab.viz.export`."""

from longcat_lab.export.hf import (
    config_from_hf,
    from_hub_state_dict,
    hf_config_dict,
    load_hf,
    save_hf,
    serve_commands,
    to_hub_state_dict,
)
from longcat_lab.export.sizes import PADDING, TENSOR_GROUPS, cache_bytes_per_token, checkpoint_bytes

__all__ = [
    "save_hf",
    "load_hf",
    "hf_config_dict",
    "config_from_hf",
    "to_hub_state_dict",
    "from_hub_state_dict",
    "serve_commands",
    "checkpoint_bytes",
    "cache_bytes_per_token",
    "TENSOR_GROUPS",
    "PADDING",
]
