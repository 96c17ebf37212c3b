"""The routing summary of a model on held-out text: FFN experts per token per MoE layer (the compute zero experts
save) and per token class (`data.tokenclass`: the paper's finding that function words, digits and punctuation get
fewer experts), and the load imbalance of the FFN experts (the most-loaded expert's share over the mean share;
1.0 is perfectly even). Measured in eval mode, so the routers count nothing and training state is untouched."""

from __future__ import annotations

import torch

from longcat_lab.data import eval_windows
from longcat_lab.data.tokenclass import TOKEN_CLASSES, token_class


@torch.no_grad()
def routing_summary(model, dataset, seq_len: int, windows: int = 8, batch_size: int = 8) -> dict:
    """{"layers": [{layer, ffn_experts_per_token, load_imbalance}], "by_class": {class: mean FFN experts},
    "ffn_experts_per_token": mean over layers and tokens, "uniform": K*N/(N+Z)}; {} for a model without MoE."""
    c = model.config
    if not model.moe_blocks():
        return {}
    N = c.n_routed_experts
    vocab = dataset.tokenizer.get_vocab()
    text_of = {i: dataset.tokenizer.decode([i]) for i in vocab.values() if i < c.vocab_size}
    class_sum = dict.fromkeys(TOKEN_CLASSES, 0.0)
    class_n = dict.fromkeys(TOKEN_CLASSES, 0)
    per_layer: dict[int, list] = {}
    was_training = model.training
    model.eval()
    try:
        for domain, stream in dataset.val.items():
            x, _ = eval_windows(stream, seq_len, windows)
            classes = {i: token_class(text_of.get(i, ""), domain == "python") for i in x.unique().tolist()}
            for i in range(0, x.shape[0], batch_size):
                xb = x[i : i + batch_size]
                routing = model(xb.to(model.device), return_routing=True).routing
                mean_ffn = None
                for li, r in enumerate(routing.layers):
                    if r is None:
                        continue
                    ffn = r.ffn_experts_per_token.double().cpu()
                    load = torch.bincount(r.topk_ids.flatten().cpu(), minlength=c.num_experts)[:N].double()
                    acc = per_layer.setdefault(li, [0.0, 0, torch.zeros(N, dtype=torch.float64)])
                    acc[0] += float(ffn.sum())
                    acc[1] += ffn.numel()
                    acc[2] += load
                    mean_ffn = ffn if mean_ffn is None else mean_ffn + ffn
                n_moe = sum(r is not None for r in routing.layers)
                for tok, f in zip(xb.flatten().tolist(), (mean_ffn / n_moe).flatten().tolist()):
                    cls = classes[tok]
                    class_sum[cls] += f
                    class_n[cls] += 1
    finally:
        model.train(was_training)
    layers = []
    for li, (s, n, load) in sorted(per_layer.items()):
        imbalance = float(load.max() / load.mean()) if load.sum() > 0 else float("nan")
        layers.append({"layer": li, "ffn_experts_per_token": s / n, "load_imbalance": imbalance})
    return {
        "layers": layers,
        "by_class": {k: class_sum[k] / class_n[k] for k in TOKEN_CLASSES if class_n[k]},
        "tokens_by_class": {k: class_n[k] for k in TOKEN_CLASSES if class_n[k]},
        "ffn_experts_per_token": sum(la["ffn_experts_per_token"] for la in layers) / len(layers),
        "uniform": c.uniform_ffn_experts,
    }


__all__ = ["routing_summary"]
