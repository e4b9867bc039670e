"""Plotly figures for the analysis app, built from vlpgraph.results.analysis' tables.

Pure functions (data in, ``go.Figure`` out): the app caches them per store version, and tests
check what they draw without a browser.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence

import networkx as nx
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from vlpgraph.results.analysis import ema, pointing

PALETTE = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52"]
ROLE_COLOURS = {  # node role -> colour on the graph page (every registry.ROLES entry: a role without one is not drawn)
    "dataset": "#4C78A8", "encoder": "#F58518", "decoder": "#EECA3B", "head": "#B279A2", "mixer": "#E45756",
    "objective": "#54A24B", "trainer": "#333333", "evaluator": "#72B7B2",
}
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=45), legend=dict(orientation="h", y=-0.2))


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(**_LAYOUT, xaxis_visible=False, yaxis_visible=False, height=250)
    return fig


# --------------------------------------------------------------------------- runs page


def curves_figure(curves: pd.DataFrame, labels: Mapping[str, str], name: str, smoothing: float = 0.0,
                  x: str = "step") -> go.Figure:
    """Training curves overlaid, one colour per run: the raw (downsampled) points faint, the
    smoothed line on top when smoothing > 0."""
    if curves.empty:
        return empty_figure(f"no '{name}' values logged by these runs")
    fig = go.Figure()
    for i, (run_id, group) in enumerate(curves.groupby("run_id", sort=False)):
        c = colour(i)
        label = labels.get(run_id, run_id)
        xs, ys = group[x].tolist(), group["value"].tolist()
        if smoothing > 0:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=_rgba(c, 0.25), width=1),
                                     name=label, legendgroup=run_id, showlegend=False, hoverinfo="skip"))
            ys = ema(ys, smoothing)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=c, width=2), name=label,
                                 legendgroup=run_id))
    fig.update_layout(**_LAYOUT, title=name + (f" (EMA smoothing {smoothing:g})" if smoothing else ""),
                      xaxis_title="training wall time (s)" if x == "wall_s" else "step", yaxis_title=name,
                      height=420)
    return fig


def parallel_figure(table: pd.DataFrame, axes: Sequence[str], colour_by: str) -> go.Figure:
    """One line per run through its values on each axis (swept params, then metrics), coloured by
    ``colour_by``; drag on an axis to filter in the browser."""
    dims = [dict(label=a, values=table[a].astype(float)) for a in axes]
    fig = go.Figure(go.Parcoords(line=dict(color=table[colour_by].astype(float), colorscale="Viridis",
                                           showscale=True, colorbar=dict(title=colour_by)),
                                 dimensions=dims))
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=60, t=60, b=30)}, height=400)
    return fig


# --------------------------------------------------------------------------- ablations


def ablation_figure(long: pd.DataFrame, metric: str, rows: str, cols: str | None) -> go.Figure:
    """mean ± std per (row, col): a line per row over a numeric column, grouped bars otherwise."""
    if long.empty:
        return empty_figure(f"no completed runs with {metric}")
    numeric = cols is not None and pd.to_numeric(long["col"], errors="coerce").notna().all()
    fig = go.Figure()
    for i, (row, group) in enumerate(long.groupby("row", sort=False, dropna=False)):
        group = group.sort_values("col") if numeric else group
        xs = group["col"].tolist() if cols else ["all"] * len(group)
        text = [f"n={n}" for n in group["n"]]
        err = dict(type="data", array=group["std"].tolist(), visible=True)
        if numeric:
            fig.add_trace(go.Scatter(x=xs, y=group["mean"], error_y=err, mode="lines+markers", name=str(row),
                                     line=dict(color=colour(i)), text=text))
        else:
            fig.add_trace(go.Bar(x=[str(v) for v in xs], y=group["mean"], error_y=err, name=str(row),
                                 marker_color=colour(i), text=text))
    fig.update_layout(**_LAYOUT, barmode="group", title=f"{metric}: mean ± std over runs, by {rows}",
                      xaxis_title=cols or "", yaxis_title=metric, height=420)
    return fig


# --------------------------------------------------------------------------- data efficiency


def efficiency_figure(long: pd.DataFrame, metric: str, x: str, x_title: str, baseline: str,
                      target: float | None, marks: pd.DataFrame | None = None) -> go.Figure:
    """``metric`` against x (``col`` = the train fraction, or ``wall_s``) with a ±std band per
    variant, the baseline's full-data value as a dashed line and a star where each variant first
    reaches it (``marks``: efficiency()'s table; column ``fraction`` or ``wall_s`` as x)."""
    if long.empty:
        return empty_figure(f"no completed runs with {metric}")
    fig = go.Figure()
    for i, (variant, group) in enumerate(long.groupby("row", sort=False)):
        group = group.sort_values("col")  # in order of data amount, also when x is the wall time
        c = colour(i)
        xs, mean, std = group[x].astype(float).to_numpy(), group["mean"].to_numpy(), group["std"].to_numpy()
        fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]), y=np.concatenate([mean + std, (mean - std)[::-1]]),
                                 mode="lines", fill="toself", fillcolor=_rgba(c, 0.15), line=dict(width=0), hoverinfo="skip",
                                 legendgroup=str(variant), showlegend=False, name=f"{variant} ± std"))
        fig.add_trace(go.Scatter(x=xs, y=mean, mode="lines+markers", name=str(variant), legendgroup=str(variant),
                                 line=dict(color=c, width=3 if variant == baseline else 2),
                                 customdata=np.stack([std, group["n"].to_numpy()], axis=-1),
                                 hovertemplate="%{x:.3g}: %{y:.3f} ± %{customdata[0]:.3f} (n=%{customdata[1]})"))
        if marks is not None and target is not None:
            hit = marks[(marks["variant"] == variant) & marks["fraction"].notna()]
            mark_x = "fraction" if x == "col" else "wall_s"
            if not hit.empty:
                fig.add_trace(go.Scatter(x=hit[mark_x], y=[target] * len(hit), mode="markers",
                                         marker=dict(symbol="star", size=16, color=c, line=dict(color="black", width=1)),
                                         name=f"{variant} reaches {baseline}@max", legendgroup=str(variant),
                                         showlegend=False,
                                         hovertemplate=f"{variant} reaches {target:.3f} at %{{x:.3g}}<extra></extra>"))
    if target is not None:
        fig.add_hline(y=target, line_dash="dash", line_color="grey",
                      annotation_text=f"{baseline} with all the data: {target:.3f}", annotation_position="bottom right")
    fig.update_layout(**_LAYOUT, title=f"{metric} vs {x_title}", xaxis_title=x_title, yaxis_title=metric, height=430)
    return fig


# --------------------------------------------------------------------------- patch heatmaps


def png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def upscale_png(png: bytes, size: int = 192) -> bytes:
    """A small PNG enlarged with nearest-neighbour (pixels stay pixels) for st.image."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = max(1, size // max(img.size))
    out = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(out, format="PNG")
    return out.getvalue()


def png_tiles(png: bytes, tile: int) -> list[bytes]:
    """A row of square ``tile``-pixel images side by side (evaluator.documents' strip) -> one PNG each."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    out = []
    for x in range(0, img.width - tile + 1, tile):
        buf = io.BytesIO()
        img.crop((x, 0, x + tile, min(tile, img.height))).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def heatmap_figure(sample: Mapping[str, Any], opacity: float = 0.5, title: str = "", show_boxes: bool = True,
                   size: int = 360) -> go.Figure:
    """The image with its patch scores laid over it (opacity), the ground-truth boxes (green) and
    the highest-scoring patch (white if it touches a box: a pointing hit; red if not)."""
    image = png_array(sample["image"])
    h, w = image.shape[:2]
    gh, gw = int(sample["grid_h"]), int(sample["grid_w"])
    scores = np.asarray(sample["scores"], dtype=np.float64).reshape(gh, gw)
    point = pointing(sample, (h, w))
    fig = go.Figure(go.Image(z=image, hoverinfo="skip"))
    fig.add_trace(go.Heatmap(z=scores, x0=point["patch_w"] / 2, dx=point["patch_w"], y0=point["patch_h"] / 2,
                             dy=point["patch_h"], colorscale="Inferno", opacity=opacity, showscale=True,
                             colorbar=dict(title="score", thickness=12),
                             hovertemplate="patch (%{y:.0f}, %{x:.0f}) px: %{z:.3f}<extra></extra>"))
    if show_boxes:
        for box in sample.get("boxes") or []:
            x0, y0, x1, y1 = box
            fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color="#00FF66", width=2))
    r, c, ph, pw = point["row"], point["col"], point["patch_h"], point["patch_w"]
    fig.add_shape(type="rect", x0=c * pw, y0=r * ph, x1=(c + 1) * pw, y1=(r + 1) * ph,
                  line=dict(color="white" if point["hit"] else "red", width=3, dash="dot"))
    verdict = {True: "pointing: hit", False: "pointing: miss", None: "pointing: no boxes"}[point["hit"]]
    fig.update_layout(title=(title + " — " if title else "") + verdict, width=size + 80, height=size,
                      margin=dict(l=10, r=10, t=40, b=10), xaxis=dict(visible=False, range=[0, w]),
                      yaxis=dict(visible=False, range=[h, 0], scaleanchor="x"))
    return fig


# --------------------------------------------------------------------------- graph


def dag_layout(document: Mapping[str, Any]) -> tuple[nx.DiGraph, dict[str, tuple[float, float]]]:
    """The trial's DAG (edge = input -> consumer) and layered positions: x = longest path from a
    source (so data sits left, evaluators right), y = spread within the layer."""
    g = nx.DiGraph()
    for name, node in (document.get("nodes") or {}).items():
        g.add_node(name, kind=node.get("kind", "?"), params=node.get("params") or {})
    for name, node in (document.get("nodes") or {}).items():
        for port, src in (node.get("inputs") or {}).items():
            for s in (src if isinstance(src, list) else [src]):
                if s in g:
                    g.add_edge(s, name, port=port)
    layers: dict[str, int] = {}
    for n in nx.topological_sort(g) if nx.is_directed_acyclic_graph(g) else g.nodes:
        layers[n] = max((layers.get(p, 0) + 1 for p in g.predecessors(n)), default=0)
    pos: dict[str, tuple[float, float]] = {}
    for layer in sorted(set(layers.values())):
        members = [n for n in g.nodes if layers[n] == layer]
        # barycentre ordering: a node sits near the mean height of what feeds it (fewer crossings)
        def height(n: str) -> float:
            fed_by = [pos[p][1] for p in g.predecessors(n)]
            return -float(np.mean(fed_by)) if fed_by else 0.0

        members.sort(key=height)
        for i, n in enumerate(members):
            pos[n] = (float(layer), (len(members) - 1) / 2 - i)
    return g, pos


def dag_figure(document: Mapping[str, Any], title: str = "") -> go.Figure:
    g, pos = dag_layout(document)
    if not g:
        return empty_figure("this run stored no graph")
    fig = go.Figure()
    for s, t in g.edges:  # arrows only: port names would clutter; the page's table lists them
        (x0, y0), (x1, y1) = pos[s], pos[t]
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                           arrowhead=2, arrowsize=1.2, arrowwidth=1.5, arrowcolor="#999", standoff=16, startstandoff=16,
                           text="")
    for role, colour_ in ROLE_COLOURS.items():
        names = [n for n in g.nodes if g.nodes[n]["kind"].split(".")[0] == role]
        if not names:
            continue
        hover = []
        for n in names:
            params = g.nodes[n]["params"]
            lines = [f"<b>{n}</b> ({g.nodes[n]['kind']})"] + [f"{k}: {json.dumps(v)}" for k, v in params.items()]
            hover.append("<br>".join(lines))
        fig.add_trace(go.Scatter(
            x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", name=role,
            marker=dict(size=34, color=colour_, line=dict(color="white", width=2)), text=names,
            textposition="bottom center", hovertext=hover, hoverinfo="text"))
    fig.update_layout(**{**_LAYOUT, "legend": dict(orientation="h", y=-0.05), "margin": dict(l=20, r=20, t=50, b=40)},
                      title=title, height=540,
                      xaxis=dict(visible=False), yaxis=dict(visible=False), hoverlabel=dict(align="left"))
    return fig

