"""Ablations: a metric pivoted by variant (or any param) x any swept param, mean ± std (n)."""

import streamlit as st

from vlpgraph.app import common
from vlpgraph.results import analysis, plots
from vlpgraph.store import Store


@st.cache_data(max_entries=256, show_spinner=False)
def pivot(root: str, version: tuple, metric: str, rows: str, cols: str | None, filters: tuple):
    """(table shown = CSV downloaded, figure), cached per store version."""
    long = analysis.aggregate(Store(root), metric, rows, cols, filters)
    return analysis.pivot_table(long, rows, cols), plots.ablation_figure(long, metric, rows, cols)


st.title("Ablations")
common.require_runs()
base = common.base_filters()
types = common.q("filter_columns")
swept = common.q("swept_columns", base)
metrics_df = common.q("eval_metrics", base)
headline = analysis.headline_metrics(metrics_df)
metric_options = headline + [m for m in metrics_df["name"] if m not in headline] + [analysis.WALL_S]

row_options = ["variant"] + swept + [c for c in types if c not in swept and c != "variant"]
col_options = ["(none)"] + swept + ["seed"]
default_col = next((i for i, c in enumerate(col_options) if c.endswith("train_fraction")), 1 if swept else 0)

c1, c2, c3 = st.columns(3)
metric = c1.selectbox("metric", metric_options, key="abl_metric",
                      help="evaluator.metric at each run's final step; wall_s = training wall time")
rows = c2.selectbox("rows", row_options, key="abl_rows")
cols = c3.selectbox("columns", col_options, index=default_col, key="abl_cols")
cols = None if cols == "(none)" else cols

s = common.store()
table, fig = pivot(str(s.root), s.version(), metric, rows, cols, base)
st.caption(f"{metric}: mean ± sample std (n runs) over every completed run of {common.graph_label()}, "
           "aggregated in DuckDB; – = no completed run in that cell.")
if table.empty:
    st.info(f"No completed run has {metric} yet.")
    st.stop()
st.dataframe(table, key="abl_table")
st.download_button("Download CSV (exactly this table)", table.to_csv(), file_name=f"ablation_{metric}.csv",
                   mime="text/csv", key="abl_csv")
st.plotly_chart(fig, key="abl_fig")
