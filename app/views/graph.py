"""Graph: the DAG of a run's resolved graph, coloured by node role, params on hover."""

import pandas as pd
import streamlit as st

from vlpgraph.app import common
from vlpgraph.results import analysis, plots
from vlpgraph.store import Store


@st.cache_data(max_entries=256, show_spinner=False)
def dag(root: str, version: tuple, run_id: str):
    doc = analysis.run_documents(Store(root), [run_id]).get(run_id, {})
    return doc, plots.dag_figure(doc, f"{doc.get('graph', '?')} / {doc.get('variant', '?')} (seed {doc.get('seed')})")


st.title("Graph")
common.require_runs()
runs = common.q("graph_runs", common.base_filters())
labels = analysis.run_labels(runs)
run_id = st.selectbox("run", runs["run_id"].tolist(), format_func=lambda r: labels.get(r, r), key="graph_run")
s = common.store()
doc, fig = dag(str(s.root), s.version(), run_id)
st.plotly_chart(fig, key="graph_fig")
nodes = doc.get("nodes") or {}
st.dataframe(pd.DataFrame([
    {"node": n, "kind": v.get("kind"), "role": str(v.get("kind", "?")).split(".")[0],
     "inputs": ", ".join(f"{p}←{s if isinstance(s, str) else '+'.join(s)}" for p, s in (v.get("inputs") or {}).items())}
    for n, v in nodes.items()]), hide_index=True, key="graph_nodes")
