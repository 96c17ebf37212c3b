"""Tests for the routing and activation figures of longcat_lab.viz, on a tiny random-init model and on
hand-made routing: a dead expert, routing entirely onto zero experts, a one-token prompt, non-ASCII text, and a run
folder with no metrics yet. The numbers behind each figure are checked against slow, obviously-correct loops.

Run: `bash tools/test.sh tests/viz/test_viz.py`
"""

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import longcat_lab.viz as viz
from longcat_lab.data.tokenclass import token_class
from longcat_lab.model import presets
from longcat_lab.model.routing import LayerRouting, Routing
from longcat_lab.testing import random_model
from longcat_lab.train import metrics, read_metrics


@pytest.fixture(scope="module")
def model():
    return random_model(presets.tiny(), seed=0)


def routed(model, length=20, batch=1, seed=1):
    idx = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        routing = model(idx, return_routing=True).routing
    return routing


def synthetic_routing(ids_LBSK, n_ffn, n_total):
    """A Routing record with the given expert choices in every layer (weights and probabilities uniform)."""
    layers = []
    for ids in ids_LBSK:
        ids = torch.as_tensor(ids, dtype=torch.long)
        B, S, K = ids.shape
        probs = torch.full((B, S, n_total), 1.0 / n_total)
        layers.append(
            LayerRouting(
                topk_ids=ids,
                topk_weights=torch.full((B, S, K), 1.0 / n_total),
                ffn_experts_per_token=(ids < n_ffn).sum(-1),
                router_logits=probs.log(),
                router_probs=probs,
            )
        )
    return Routing(layers, torch.zeros(1, 1, 1), n_ffn)


def tokens_for(n):
    return [f" t{i}" for i in range(n)]


# Expert load ---------------------------------------------------------------------------------------------------
def test_expert_load_matches_a_count_loop_and_routing_health(model):
    c = model.config
    N = c.n_routed_experts
    routing = routed(model, length=24, batch=2)
    load = viz.expert_load(routing, c)
    health = metrics.routing_health(routing, model)
    for row, l in enumerate(load.layers):
        ref = np.zeros(c.num_experts)
        for e in routing.layers[l].topk_ids.reshape(-1).tolist():
            ref[e] += 1
        np.testing.assert_array_equal(load.counts[row], ref)
        # the same relative load and flags as the routing-health metrics the trainer logs
        np.testing.assert_allclose(load.relative[row, :N], health["relative_load"][row])
        np.testing.assert_allclose(load.relative[row, N:], health["zero_relative_load"][row])
        assert load.dead[row, :N].tolist() == health["dead"][row] and load.hot[row, :N].tolist() == health["hot"][row]
        assert load.ffn_experts_per_token[row] == pytest.approx(health["ffn_experts_mean"][row])
    assert (load.tokens == 48).all()
    np.testing.assert_allclose(load.ideal.sum(1), 48 * c.moe_topk)
    assert isinstance(viz.expert_load_heatmap(load), go.Figure)


def test_expert_load_from_router_counts_agrees_with_routing(model):
    routing = routed(model, length=16, seed=3)
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    model.train()
    try:
        for b in model.moe_blocks():
            b.router.expert_counts.zero_()
        with torch.no_grad():
            model(idx)
        counts = viz.router_counts(model)
    finally:
        for b in model.moe_blocks():
            b.router.expert_counts.zero_()
        model.eval()
    np.testing.assert_array_equal(
        viz.expert_load(counts, model.config).counts, viz.expert_load(routing, model.config).counts
    )
    both = viz.expert_load([routing, routed(model, length=5, seed=4)], model.config)
    assert (both.tokens == 21).all()


def test_dead_and_hot_experts_are_marked(model):
    c = model.config  # 4 FFN + 2 zero experts, top-2
    # 8 tokens: F0 chosen by all (8 of 9 FFN selections, ideal 2.25: hot), F2 once, F1 and F3 never (dead)
    ids = np.array([[0, 4], [0, 5], [0, 4], [0, 5], [0, 4], [0, 5], [0, 4], [0, 2]])[None]
    routing = synthetic_routing([ids, ids], c.n_routed_experts, c.num_experts)
    load = viz.expert_load(routing, c)
    assert load.dead[:, [1, 3]].all() and load.dead.sum() == 4
    assert load.hot[:, 0].all() and load.hot.sum() == 2
    assert load.ffn_experts_per_token == pytest.approx([9 / 8, 9 / 8])
    fig = viz.expert_load_heatmap(load)
    dead = next(t for t in fig.data if t.name.startswith("dead"))
    hot = next(t for t in fig.data if t.name.startswith("hot"))
    assert sorted(dead.x) == ["F1", "F1", "F3", "F3"] and list(hot.x) == ["F0", "F0"]


def test_expert_load_rejects_bad_inputs(model):
    c = model.config
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        viz.expert_load(np.ones((2, 3)), c)
    with pytest.raises(ValueError, match="no selections"):
        viz.expert_load(np.zeros((2, c.num_experts)), c)
    with pytest.raises(ValueError, match="negative"):
        viz.expert_load(-np.ones((2, c.num_experts)), c)
    with pytest.raises(ValueError, match="Routing record"):
        viz.expert_load("not routing", c)


def test_everything_routed_to_zero_experts():
    c = presets.tiny()
    m = random_model(c, seed=0)
    for b in m.moe_blocks():
        b.router.e_score_correction_bias[c.n_routed_experts :] = 10.0  # selection only: every pick a zero expert
    routing = routed(m, length=10)
    load = viz.expert_load(routing, c)
    assert load.dead[:, : c.n_routed_experts].all() and not load.dead[:, c.n_routed_experts :].any()
    assert (load.ffn_experts_per_token == 0).all() and not load.hot.any()
    assert (viz.token_compute(routing) == 0).all()
    params = viz.activated_params_per_token(routing, c)
    assert np.allclose(params, m.activated_params()["min"])
    fig = viz.token_compute_map(tokens_for(10), routing)
    assert np.nansum(fig.data[0].z) == 0
    assert "0 FFN [] + 2 zero" in fig.data[0].hovertext[0][0]


# Routing a text ------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """A stand-in for a tokenizers.Tokenizer: one token per UTF-8 byte, offsets in characters (as tokenizers gives),
    so a multi-byte character is split over several tokens just as byte-level BPE splits rare characters."""

    class Encoding:
        def __init__(self, ids, offsets):
            self.ids, self.offsets = ids, offsets

    def encode(self, text):
        ids, offsets = [], []
        for i, ch in enumerate(text):
            for b in ch.encode():
                ids.append(b)
                offsets.append((i, i + 1))
        return self.Encoding(ids, offsets)


def test_route_text_non_ascii_and_one_token(model):
    model.train()
    tokens, routing = viz.route_text(model, ByteTokenizer(), "né 中")
    assert model.training  # the caller's mode is restored
    model.eval()
    assert tokens == ["n", "é", "é", " ", "中", "中", "中"]
    assert routing.layers[0].topk_ids.shape[:2] == (1, 7)
    assert all(int(b.router.expert_counts.sum()) == 0 for b in model.moe_blocks())  # eval: counts untouched
    one, routing = viz.route_text(model, ByteTokenizer(), "x")
    assert one == ["x"] and viz.token_compute(routing).shape == (1, 2)
    assert len(viz.route_text(model, ByteTokenizer(), "abcdef", max_tokens=4)[0]) == 4
    with pytest.raises(ValueError, match="text=''"):
        viz.route_text(model, ByteTokenizer(), "")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        viz.route_text(model, ByteTokenizer(), "a" * 600)


# Token compute map ---------------------------------------------------------------------------------------------
def test_token_compute_map_values_and_hover(model):
    routing = routed(model, length=15, batch=2)
    per_layer = viz.token_compute(routing, batch_index=1)
    assert per_layer.shape == (15, 2)
    ref = np.stack([routing.layers[l].ffn_experts_per_token[1].numpy() for l in (0, 1)], axis=1)
    np.testing.assert_array_equal(per_layer, ref)
    fig = viz.token_compute_map(tokens_for(15), routing, batch_index=1, per_row=4)
    z = fig.data[0].z
    assert np.array(z).shape == (4, 4)
    np.testing.assert_array_equal(np.array(z, dtype=float).reshape(-1)[:15], ref.sum(1))
    assert np.isnan(np.array(z, dtype=float)[3, 3])
    chosen = sorted(e for e in routing.layers[1].topk_ids[1, 5].tolist() if e < 4)
    assert f"layer 1: {len(chosen)} FFN {chosen}" in fig.data[0].hovertext[1][1]
    one = viz.token_compute_map(tokens_for(15), routing, layer=0, batch_index=1)
    np.testing.assert_array_equal(np.array(one.data[0].z, dtype=float).reshape(-1)[:15], ref[:, 0])
    assert one.data[0].zmax == 2 and fig.data[0].zmax == 4


def test_token_compute_map_one_token_and_non_ascii(model):
    text = ["é"]
    fig = viz.token_compute_map(text, routed(model, length=1))
    assert np.array(fig.data[0].z).shape == (1, 12) and fig.data[0].text[0][0] == "é"
    tokens = ["中", "文", " naïve", "🙂", "\n", "<b>", " "]
    fig = viz.token_compute_map(tokens, routed(model, length=len(tokens)))
    assert [fig.data[0].text[0][i] for i in range(7)] == ["中", "文", "·naïve", "🙂", "⏎", "&lt;b&gt;", "·"]


def test_token_compute_map_rejects_bad_inputs(model):
    routing = routed(model, length=5)
    with pytest.raises(ValueError, match="tokens has 4 entries"):
        viz.token_compute_map(tokens_for(4), routing)
    with pytest.raises(ValueError, match="layer=7"):
        viz.token_compute_map(tokens_for(5), routing, layer=7)
    with pytest.raises(ValueError, match="batch_index=1"):
        viz.token_compute_map(tokens_for(5), routing, batch_index=1)
    with pytest.raises(ValueError, match="per_row=0"):
        viz.token_compute_map(tokens_for(5), routing, per_row=0)
    dense = random_model(presets.tiny(layer_style="dense"))
    with pytest.raises(ValueError, match="no MoE layers"):
        viz.token_compute_map(tokens_for(5), routed(dense, length=5))


# Domains and token classes -------------------------------------------------------------------------------------
def make_table(model):
    prose = [" The", " cat", ",", " and", " 42", " dogs", ".", "\n"]
    code = ["def", " f", "(", "x", "):", "\n   ", " return", " x", " and", " 1"]
    maths = ["12", " +", " 30", " =", " 42"]
    samples = [
        (d, toks, routed(model, length=len(toks), seed=s))
        for s, (d, toks) in enumerate([("shakespeare", prose), ("python", code), ("reasoning", maths)])
    ]
    return viz.token_table(samples), samples


def test_token_table_stats_cover_every_token(model):
    table, samples = make_table(model)
    assert len(table) == sum(len(t) for _, t, _ in samples) == 23
    stats = table.stats("class")
    assert sum(s["count"] for s in stats.values()) == len(table)
    # reference: a loop over every token of every sample
    ref: dict[str, list[int]] = {}
    for domain, toks, routing in samples:
        for s, tok in enumerate(toks):
            total = sum(int(routing.layers[l].ffn_experts_per_token[0, s]) for l in (0, 1))
            ref.setdefault(token_class(tok, code=domain == "python"), []).append(total)
    assert set(ref) == set(stats)
    for cls, vals in ref.items():
        assert stats[cls]["count"] == len(vals) and stats[cls]["mean"] == pytest.approx(np.mean(vals))
    assert table.token_class[list(table.token).index(" and")] == "word"  # prose
    assert table.token_class[len(samples[0][1]) + 8] == "code keyword"  # " and" in code
    assert table.stats("domain", layer=1)["reasoning"]["mean"] == pytest.approx(
        samples[2][2].layers[1].ffn_experts_per_token.float().mean().item()
    )
    combo = table.stats("domain/class")
    assert sum(s["count"] for s in combo.values()) == len(table)


def test_group_figures(model):
    table, _ = make_table(model)
    fig = viz.ffn_experts_by_group(table, by="domain")
    bars = [t for t in fig.data if t.xaxis == "x"]
    assert len(bars) == 3
    for t in bars:
        assert sum(t.y) == pytest.approx(1.0)
    means = {t.x[0]: t.y[0] for t in fig.data if t.xaxis == "x2"}
    assert means == pytest.approx({g: s["mean"] for g, s in table.stats("domain").items()})
    heat = viz.class_domain_heatmap(table, layer=0)
    assert list(heat.data[0].y) == ["shakespeare", "python", "reasoning"]
    counts = sum(int(cell.split("n=")[1]) for row in heat.data[0].text for cell in row if cell)
    assert counts == len(table)
    with pytest.raises(ValueError, match="by='tokens'"):
        viz.ffn_experts_by_group(table, by="tokens")


def test_contrast_against_a_hand_computation():
    ffn = np.array([[1, 0], [0, 0], [1, 1], [2, 1], [2, 2], [1, 2]])  # 6 tokens, 2 layers
    table = viz.TokenTable(
        domain=np.array(["shakespeare"] * 6, dtype=object),
        sample=np.zeros(6, int),
        position=np.arange(6),
        token=np.array([",", ".", "a", "b", "c", "d"], dtype=object),
        token_class=np.array(["punctuation"] * 2 + ["word"] * 4, dtype=object),
        ffn_experts=ffn,
        layers=[0, 1],
        moe_topk=2,
        n_routed_experts=4,
    )
    c = table.stats("class")
    assert c["punctuation"] == {"count": 2, "mean": 0.5, "std": 0.5}
    r = viz.contrast(table, "punctuation", "word")
    totals_p, totals_w = np.array([1, 0]), np.array([2, 3, 4, 3])
    se = np.sqrt(totals_p.var(ddof=1) / 2 + totals_w.var(ddof=1) / 4)
    assert r["difference"] == pytest.approx(0.5 - 3.0) and r["standard_error"] == pytest.approx(se)
    assert r["verdict"] == "fewer"
    assert viz.contrast(table, "punctuation", "word", layer=0)["verdict"] == "no clear difference"  # -1 vs 2se 1.15
    with pytest.raises(ValueError, match="group='digits'"):
        viz.contrast(table, "digits", "word")


def test_token_table_rejects_bad_samples(model):
    with pytest.raises(ValueError, match="samples is empty"):
        viz.token_table([])
    with pytest.raises(ValueError, match=r"samples\[0\] tokens has 2 entries"):
        viz.token_table([("shakespeare", ["a", "b"], routed(model, length=3))])
    with pytest.raises(ValueError, match="batch 2"):
        viz.token_table([("shakespeare", ["a"], routed(model, length=1, batch=2))])
    with pytest.raises(ValueError, match="domain=''"):
        viz.token_table([("", ["a"], routed(model, length=1))])


# Activated parameters ------------------------------------------------------------------------------------------
def test_activated_params_follow_accounting(model):
    c = model.config
    routing = routed(model, length=30, batch=2)
    params = viz.activated_params_per_token(routing, c)
    assert params.shape == (60,)
    per_layer_mean = np.mean([routing.layers[l].ffn_experts_per_token.float().mean().item() for l in (0, 1)])
    assert params.mean() == pytest.approx(model.activated_params(per_layer_mean)["mean"], rel=1e-9)
    bounds = model.activated_params()
    assert bounds["min"] <= params.min() and params.max() <= bounds["max"]
    fig = viz.activated_params_histogram(routing, c)
    assert sum(fig.data[0].y) == pytest.approx(1.0)
    assert any(t.name.startswith("measured mean") for t in fig.data)
    table, _ = make_table(model)
    assert len(viz.activated_params_per_token(table, c)) == len(table)
    with pytest.raises(ValueError, match="moe_topk=3"):
        viz.activated_params_per_token(routing, c.replace(moe_topk=3))


# Metrics and the controller ------------------------------------------------------------------------------------
def test_run_folder_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no metrics.jsonl yet"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="has no metrics.jsonl yet"):
        viz.controller_traces(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics rows yet"):
        read_metrics(tmp_path)


def test_read_metrics_skips_a_half_written_last_line(tmp_path):
    rows = [{"step": i, "loss": 5.0 - i} for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_metrics(tmp_path) == rows
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.warns(UserWarning, match="metrics.jsonl: line 2 skipped: not JSON"):
        assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0}, {"step": 1}]


def test_controller_traces(tmp_path):
    k = viz.CONTROLLER_KEYS
    rows = [
        {
            "step": s,
            k["error"]: 0.1 / (s + 1),
            k["spread"]: 0.01 * s,
            k["per_layer"]: [1.0 + 0.1 * s, 1.5],
            k["mean"]: 1.25 + 0.05 * s,
            k["target"]: 1.33,
        }
        for s in range(5)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = viz.controller_traces(tmp_path)
    layer0 = next(t for t in fig.data if t.name == "layer 0")
    np.testing.assert_allclose(layer0.y, [1.0 + 0.1 * s for s in range(5)])
    assert list(layer0.x) == list(range(5))
    assert any(t.name == "target K_e" for t in fig.data)
    with pytest.raises(ValueError, match="carry neither"):
        viz.controller_traces([{"step": 0, "loss": 1.0}])


# Co-activation and router similarity ---------------------------------------------------------------------------
def test_coactivation_matches_a_pair_loop(model):
    c = model.config
    routing = routed(model, length=12, batch=2)
    co = viz.coactivation(routing, 1)
    ref = np.zeros((c.num_experts, c.num_experts))
    ids = routing.layers[1].topk_ids.reshape(-1, c.moe_topk).tolist()
    for chosen in ids:
        for i in chosen:
            for j in chosen:
                ref[i, j] += 1
    np.testing.assert_allclose(co, ref / len(ids))
    assert np.trace(co) == pytest.approx(c.moe_topk)
    assert isinstance(viz.coactivation_heatmap(routing, 1), go.Figure)
    other = routed(model, length=4, seed=9)
    pooled = viz.coactivation([routing, other], 1)
    np.testing.assert_allclose(pooled, (co * 24 + viz.coactivation(other, 1) * 4) / 28)
    with pytest.raises(ValueError, match="layer=2"):
        viz.coactivation(routing, 2)


def test_router_similarity(model):
    sim = viz.router_similarity(model, 0)
    w = model.layers[0].mlp.router.classifier.weight.detach()
    assert sim[1, 3] == pytest.approx(torch.cosine_similarity(w[1], w[3], dim=0).item(), abs=1e-6)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-6)
    fig = viz.router_similarity_heatmap(model, 0)
    assert "mean off-diagonal" in fig.layout.title.text
    with pytest.raises(ValueError, match="layer=-1"):
        viz.router_similarity(model, -1)


# Showing figures -----------------------------------------------------------------------------------------------
def test_figure_bundle_and_show(capsys):
    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]), layout=dict(title="bars"))
    bundle = viz.figure_bundle(fig)
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [3, 4]
    json.dumps(bundle["application/vnd.plotly.v1+json"])
    assert "cdn.plot.ly" in bundle["text/html"] and len(bundle["text/html"]) < 20_000
    viz.show(fig)  # no IPython kernel here: prints the summary
    assert capsys.readouterr().out.strip() == "<plotly figure: bars>"
    with pytest.raises(ValueError, match="go.Figure"):
        viz.figure_bundle({"data": []})


def test_figure_controls_show_one_figure(monkeypatch):
    widgets = pytest.importorskip("ipywidgets")
    shown, updates, drawn = [], [], []

    class Handle:
        def update(self, bundle, raw):
            updates.append(bundle["text/plain"])

    def display(obj, raw=False, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    monkeypatch.setattr("IPython.display.display", display)
    monkeypatch.setattr("longcat_lab.viz.common.show", lambda fig: drawn.append(fig.layout.title.text))
    slider = widgets.IntSlider(value=1, min=0, max=3)
    static = viz.figure_controls(lambda layer: go.Figure(layout=dict(title=f"layer {layer}")), layer=slider)
    # The controls (with a one-line note where no widget state was saved), then the default figure.
    assert static.layout.title.text == "layer 1" and len(shown) == 2
    assert "application/vnd.jupyter.widget-view+json" in shown[0] and "layer" in shown[0]["text/plain"]
    assert shown[1]["text/plain"] == "<plotly figure: layer 1>"
    slider.value = 2  # the default figure gives way to the one under the controls: one figure on screen
    assert drawn == ["layer 2"] and len(updates) == 1 and "plotly" not in updates[0] and len(shown) == 2
    with pytest.raises(ValueError, match="control layer=int"):
        viz.figure_controls(lambda layer: go.Figure(), layer=3)
    # Left as a cell's last value, the returned figure draws nothing more (a plain figure would draw a stale copy).
    from IPython.core.formatters import DisplayFormatter

    assert DisplayFormatter().format(static) == ({}, {})
    assert slider.style.description_width == "initial"  # labels shown whole


def test_live_plot_redraws_in_a_view_and_ends_with_the_final_figure(monkeypatch):
    pytest.importorskip("ipywidgets")
    shown, updates = [], []

    class Handle:
        def update(self, bundle, raw):
            updates.append(bundle)

    def display(obj, raw=False, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    monkeypatch.setattr("IPython.display.display", display)
    live = viz.LivePlot(lambda rows: [go.Figure(go.Scatter(x=[r["step"] for r in rows]))], every=2)
    for step in range(1, 8):
        live({"kind": "train", "step": step})
    # One live view, displayed once; its contents follow the rows (a widget state change, no output message).
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0]
    view = live.views[0]
    assert view.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["x"][-1] == 6
    figs = live.finish()
    # The view is blanked through its handle and the final figure, to the last step, follows as a new output.
    assert updates == [{"text/plain": ""}] and len(shown) == 2
    assert shown[1]["application/vnd.plotly.v1+json"]["data"][0]["x"][-1] == 7 == figs[0].data[0].x[-1]
    with pytest.raises(ValueError, match="every=0"):
        viz.LivePlot(lambda rows: [], every=0)
