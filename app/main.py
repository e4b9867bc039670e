"""vlpgraph's analysis app: `vlpgraph app [--store DIR]` starts it (Streamlit).

Thin by design: every query lives in vlpgraph.results.analysis, every figure in vlpgraph.results.plots; the pages
in views/ only lay out widgets. The store comes from $VLPGRAPH_STORE (set by `vlpgraph app`).
Installed with the package as ``vlpgraph.app`` (pyproject maps it to this folder), so it needs no
``sys.path`` edits, editable install or not.
"""

from pathlib import Path

import streamlit as st

from vlpgraph.app import common

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="vlpgraph", page_icon=":material/hub:", layout="wide")

PAGES = [
    st.Page(str(HERE / "views/runs.py"), title="Runs", icon=":material/table_rows:", url_path="runs", default=True),
    st.Page(str(HERE / "views/ablations.py"), title="Ablations", icon=":material/grid_on:", url_path="ablations"),
    st.Page(str(HERE / "views/efficiency.py"), title="Data efficiency", icon=":material/show_chart:",
            url_path="efficiency"),
    st.Page(str(HERE / "views/heatmaps.py"), title="Patch heatmaps", icon=":material/blur_on:", url_path="heatmaps"),
    st.Page(str(HERE / "views/samples.py"), title="Samples", icon=":material/photo_library:", url_path="samples"),
    st.Page(str(HERE / "views/graph.py"), title="Graph", icon=":material/account_tree:", url_path="graph"),
]

page = st.navigation(PAGES)
common.sidebar()
page.run()
