"""Runs: every run with its status, swept params and headline metrics; filters; compare runs."""

import pandas as pd
import streamlit as st

from vlpgraph.app import common
from vlpgraph.results import analysis, plots

st.title("Runs")
common.require_runs()
base = common.base_filters()

types = common.q("filter_columns")
swept = common.q("swept_columns", base)
choices = common.q("distinct_values", ["status", "variant"], base)

# ---- filters: status and variant, then any column
c1, c2 = st.columns(2)
statuses = c1.multiselect("status", choices["status"] or [], key="runs_status", placeholder="any status")
variants = c2.multiselect("variant", choices["variant"] or [], key="runs_variant", placeholder="any variant")
filters = list(base)
if statuses:
    filters.append(("status", "in", tuple(statuses)))
if variants:
    filters.append(("variant", "in", tuple(variants)))

filter_cols = st.multiselect("filter on more columns", [c for c in types if c not in ("status", "variant")],
                             key="runs_filter_cols", placeholder="pick columns to filter on")
if filter_cols:
    values = common.q("distinct_values", filter_cols, base)
    cols = st.columns(min(len(filter_cols), 3))
    for i, col in enumerate(filter_cols):
        box = cols[i % len(cols)]
        if values[col] is not None:  # few distinct values: pick them
            picked = box.multiselect(col, values[col], key=f"runs_f_{col}", placeholder="any")
            if picked:
                filters.append((col, "in", tuple(picked)))
        elif types[col] in ("DOUBLE", "BIGINT", "INTEGER"):
            lo = box.number_input(f"{col} ≥", value=None, key=f"runs_lo_{col}")
            hi = box.number_input(f"{col} ≤", value=None, key=f"runs_hi_{col}")
            if lo is not None or hi is not None:
                filters.append((col, "between", (lo, hi)))
        else:
            text = box.text_input(f"{col} contains", key=f"runs_t_{col}")
            if text:
                filters.append((col, "contains", text))
filters = tuple(filters)

# ---- metrics
metrics_df = common.q("eval_metrics", base)
all_metrics = metrics_df["name"].tolist()
c1, c2, c3 = st.columns([3, 2, 1])
common.follow_default("runs_metrics", all_metrics, analysis.headline_metrics(metrics_df))
metrics = c1.multiselect("metrics", all_metrics, key="runs_metrics", on_change=common.touched, args=("runs_metrics",))
mode_label = c2.radio("metric value", ["last", "best", "at step"], horizontal=True, key="runs_mode",
                      help="last: the latest evaluation; best: max over evaluations (min for losses); "
                           "at step: the latest evaluation at or before the step")
step = c3.number_input("step", min_value=0, value=0, step=1, key="runs_step",
                       disabled=mode_label != "at step")
mode = {"last": "last", "best": "best", "at step": "step"}[mode_label]

table = common.q("runs_table", filters, tuple(metrics), mode, int(step) if mode == "step" else None, tuple(swept))
st.caption(f"{len(table)} runs shown · graph: {common.graph_label()} · swept params: {', '.join(swept) or 'none'}")
config = {m: st.column_config.NumberColumn(m, format="%.4f") for m in metrics}
config["run_id"] = st.column_config.TextColumn("run_id", pinned=True)
for narrow in ("status", "seed", "step"):
    config[narrow] = st.column_config.Column(narrow, width="small")
order = [c for c in table.columns if not (c == "graph" and base)]  # one graph picked: no graph column
st.dataframe(table, hide_index=True, key="runs_table", column_config=config, column_order=order)

# ---- parallel coordinates: every shown run as a line through its swept params and metrics
# (plotly drops a line with a missing value, so only columns every shown run has become axes)
axes = [c for c in (*swept, *metrics) if c in table.columns and pd.api.types.is_numeric_dtype(table[c])
        and table[c].notna().all()]
if len(axes) >= 2 and len(table) > 1:
    with st.expander("Parallel coordinates (swept params → metrics)", expanded=False):
        st.caption("Axes: the swept params and metrics that every run shown has (filter by variant to see the "
                   "others). Drag along an axis to highlight a range.")
        metric_axes = [a for a in axes if a in metrics] or axes
        colour_by = st.selectbox("colour by", axes, index=axes.index(metric_axes[0]), key="runs_parcoords_colour")
        st.plotly_chart(plots.parallel_figure(table, axes, colour_by), key="runs_parcoords")

# ---- compare
st.subheader("Compare runs")
labels = analysis.run_labels(table, swept)
chosen = st.multiselect("runs to compare", table["run_id"].tolist(), format_func=lambda r: labels.get(r, r),
                        key="runs_compare", max_selections=12, placeholder="pick two or more runs")
if not chosen:
    st.caption("Pick runs to see what differs in their configs and to overlay their training curves.")
    st.stop()

diff = common.q("config_diff", tuple(chosen))
st.markdown("**Config diff** (only the keys that differ)")
if diff.empty:
    st.success("These runs have identical configs." if len(chosen) > 1 else "Pick a second run to diff.")
else:
    st.dataframe(diff.rename(columns=labels), key="runs_diff")

names = common.q("metric_names", tuple(chosen))
if not names:
    st.info("These runs logged no training values yet.")
    st.stop()
c1, c2, c3 = st.columns([2, 2, 1])
name = c1.selectbox("training value", names, key="runs_curve")
smoothing = c2.slider("smoothing (EMA)", 0.0, 0.99, 0.6, 0.01, key="runs_smoothing")
x = c3.radio("x axis", ["step", "wall time"], key="runs_x")
curves = common.q("curves", tuple(chosen), name)
st.plotly_chart(plots.curves_figure(curves, labels, name, smoothing, "wall_s" if x == "wall time" else "step"),
                key="runs_curves_fig")
if len(curves) and (curves["n"] > 1).any():
    st.caption("Long curves are downsampled in DuckDB to ≤ 400 points per run (bucket means over every logged row).")
