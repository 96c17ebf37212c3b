"""Quick looks at a model during and after training: `evaluate` (validation loss per domain on fixed windows) and
`sample_text` (a seeded continuation of a prompt). Two quick looks for the training loop and the CLI, not an
evaluation suite.
"""

from __future__ import annotations

import torch

from longcat_lab.data import Dataset, eval_windows
from longcat_lab.inference.generate import generate
from longcat_lab.model.model import LongCatLM


@torch.no_grad()
def evaluate(
    model: LongCatLM, dataset: Dataset, seq_len: int, windows: int = 16, batch_size: int = 8, bf16: bool = False
) -> dict[str, float]:
    """Mean validation cross-entropy (nats/token) per domain on fixed windows (`data.eval_windows`). Runs in eval
    mode, so the routers count nothing; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    device = model.device
    out = {}
    try:
        for domain, stream in dataset.val.items():
            x, y = eval_windows(stream, seq_len, windows)
            total, count = 0.0, 0
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(xb, targets=yb).loss
                total += float(loss) * yb.numel()
                count += yb.numel()
            out[domain] = total / count
    finally:
        model.train(was_training)
    return out


def sample_text(
    model: LongCatLM,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Prompt + continuation as text (top-p sampling with a seeded generator; greedy at temperature 0)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt={prompt!r} is not allowed: it must be a non-empty string")
    ids = tokenizer.encode(prompt).ids
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(
            f"the prompt is {len(ids)} tokens and max_new_tokens={max_new_tokens}: together more than the "
            f"model's max_position_embeddings={limit}; shorten the prompt or ask for at most {max(0, limit - len(ids))}"
            " new tokens"
        )
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_p=top_p, generator=gen)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


__all__ = ["evaluate", "sample_text"]
