"""Figure of a speculative decoding run (`longcat_lab.inference.speculative`; docs/design.md §6.2): every generated
token as a cell coloured by where it came from, an accepted MTP draft or the main model, with the running acceptance
rate of the drafts along the output."""

from __future__ import annotations

from plotly.subplots import make_subplots

DRAFT_COLOUR, MAIN_COLOUR = "#54a24b", "#4c78a8"


def speculative_figure(stats, labels: list[str] | None = None, title: str = "Speculative decoding, token by token"):
    """Top: a strip of cells, one per generated token (`stats.from_draft`), green where an accepted draft supplied it,
    blue where the main model did; `labels` (the tokens' text) show on hover. Bottom, on its own 0-1 axis: the
    acceptance rate of the drafts made so far (`stats.accepted`), placed at the token each verification produced."""
    kinds = list(stats.from_draft)
    if labels is not None and len(labels) != len(kinds):
        raise ValueError(f"labels has {len(labels)} entries but the run generated {len(kinds)} tokens")
    hover = labels if labels is not None else [""] * len(kinds)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.08)
    for flag, name, colour in ((True, "accepted MTP draft", DRAFT_COLOUR), (False, "main model", MAIN_COLOUR)):
        xs = [i for i, k in enumerate(kinds) if k == flag]
        fig.add_bar(
            x=xs,
            y=[1.0] * len(xs),
            name=name,
            marker_color=colour,
            hovertext=[repr(hover[i]) for i in xs],
            hovertemplate="token %{x}: %{hovertext}<extra>" + name + "</extra>",
            row=1,
            col=1,
        )
    # Verification v produced the token after the first one and after each earlier cycle's tokens.
    at, rates, position, accepted = [], [], 0, 0
    for v, ok in enumerate(stats.accepted):
        position += 1
        accepted += ok
        at.append(position)
        rates.append(accepted / (v + 1))
        position += ok  # an accepted draft is followed by the main model's own next token
    fig.add_scatter(
        x=at, y=rates, mode="lines", name="acceptance so far", line=dict(color="black", width=2), row=2, col=1
    )
    rate = sum(stats.accepted) / len(stats.accepted) if stats.accepted else float("nan")
    fig.update_layout(
        title=f"{title}: {len(kinds)} tokens, {len(stats.accepted)} drafts, {rate:.0%} accepted",
        bargap=0.05,
        barmode="overlay",
        height=380,
        margin=dict(l=10, r=10, t=50, b=40),
    )
    fig.update_yaxes(visible=False, range=[0, 1], row=1, col=1)  # the strip: only its colours carry meaning
    fig.update_yaxes(range=[0, 1.05], title_text="drafts accepted so far", tickformat=".0%", row=2, col=1)
    fig.update_xaxes(title_text="generated token", row=2, col=1)
    return fig


__all__ = ["speculative_figure"]
