"""Data efficiency: a metric against the train fraction and against training wall time, a line per
variant with a ±std band, and where each variant reaches the baseline's full-data value."""

import pandas as pd
import streamlit as st

from vlpgraph.app import common
from vlpgraph.results import analysis, plots
from vlpgraph.store import Store


@st.cache_data(max_entries=256, show_spinner=False)
def figures(root: str, version: tuple, metric: str, x: str, baseline: str, filters: tuple):
    long = analysis.aggregate(Store(root), metric, "variant", x, filters)
    long = long[long["col"].notna()].astype({"col": float}) if len(long) else long
    target, marks = analysis.efficiency(long, baseline)
    by_fraction = plots.efficiency_figure(long, metric, "col", x, baseline, target, marks)
    by_time = plots.efficiency_figure(long, metric, "wall_s", "training wall time (s)", baseline, target, marks)
    return target, marks, by_fraction, by_time


st.title("Data efficiency")
common.require_runs()
base = common.base_filters()
swept = common.q("swept_columns", base)
types = common.q("filter_columns")
numeric = [c for c in swept if types.get(c) in ("DOUBLE", "BIGINT", "INTEGER")]
fractions = [c for c in numeric if c.endswith("train_fraction")] + [c for c in numeric if not c.endswith("train_fraction")]
if not fractions:
    st.info(f"The runs of {common.graph_label()} sweep no numeric param. This page needs a sweep over a "
            "`*.train_fraction` param, e.g.\n\n```\nvlpgraph run graphs/timix_sweep.yaml\n```")
    st.stop()

metrics_df = common.q("eval_metrics", base)
if metrics_df.empty:
    st.info(f"The runs of {common.graph_label()} have no evaluation yet: evaluators run when a trial's "
            "training ends. Press Refresh later.")
    st.stop()
headline = analysis.headline_metrics(metrics_df)
variants = common.q("distinct_values", ["variant"], base)["variant"] or []
c1, c2, c3 = st.columns(3)
metric = c1.selectbox("metric", headline + [m for m in metrics_df["name"] if m not in headline], key="eff_metric")
x = c2.selectbox("data amount (x)", fractions, key="eff_x")
baseline = c3.selectbox("baseline", variants, index=variants.index("baseline") if "baseline" in variants else 0,
                        key="eff_baseline")

s = common.store()
target, marks, by_fraction, by_time = figures(str(s.root), s.version(), metric, x, baseline, base)
left, right = st.columns(2)
left.plotly_chart(by_fraction, key="eff_fraction_fig")
right.plotly_chart(by_time, key="eff_time_fig")
if target is None:
    st.info(f"No completed run of the baseline '{baseline}' has {metric} yet.")
    st.stop()
st.markdown(f"**Where each variant reaches {baseline}'s {metric} with all the data ({target:.3f})** — "
            "linear interpolation between grid points; ★ on the charts.")
shown = marks.assign(
    fraction=marks["fraction"].map(lambda v: "never (within the grid)" if pd.isna(v) else f"{v:.2f}"),
    wall_s=marks["wall_s"].map(lambda v: "–" if pd.isna(v) else f"{v:.1f}"),
    time_share=marks["time_share"].map(lambda v: "–" if pd.isna(v) else f"{v:.0%}"),
    value_at_max=marks["value_at_max"].map(lambda v: f"{v:.3f}"),
).rename(columns={"fraction": f"{x} needed", "wall_s": "wall s then", "time_share": f"share of {baseline}'s time",
                  "value_at_max": f"{metric} at max {x}"})
st.dataframe(shown, hide_index=True, key="eff_table")
