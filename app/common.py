"""What every page shares: the store, cached queries, the sidebar's graph filter, the empty-store notice.

Caching: a query's result is cached under (store path, store version, arguments); the version is
the size and mtime of the DuckDB file and its WAL (Store.version(), a stat call), so a page re-run
after nothing changed costs no query, and one after a sweep wrote something sees the new rows; a
quarter-lease clock is part of the key too, so a run whose runner died shows as stale.
"""

from __future__ import annotations

import re
import time
from typing import Any

import streamlit as st

from vlpgraph.results import analysis
from vlpgraph.store import Store, default_root, lease_s

ALL_GRAPHS = "(all graphs)"


def store() -> Store:
    return Store(default_root())


@st.cache_data(max_entries=2048, show_spinner=False)
def _query(name: str, root: str, version: tuple, args: tuple, kwargs: tuple) -> Any:
    return getattr(analysis, name)(Store(root), *args, **dict(kwargs))


def q(name: str, *args: Any, **kwargs: Any) -> Any:
    """analysis.<name>(store, *args, **kwargs), cached per store version (arguments must be hashable
    or plain lists/tuples/dicts)."""
    s = store()
    # A runner that dies changes nothing in the store, yet its runs must turn 'stale' once the lease
    # passes: the key also changes every quarter lease, so a page re-run then reads again.
    tick = int(time.time() // (lease_s() / 4))
    return _query(name, str(s.root), (*s.version(), tick), tuple(args), tuple(sorted(kwargs.items())))


def sidebar() -> None:
    """Store path, graph filter (newest graph by default), status counts, a refresh button."""
    s = store()
    ov = q("overview")
    with st.sidebar:
        st.caption(f"store: `{s.root}`")
        graphs = [g["graph"] for g in ov["graphs"]]
        if graphs:
            st.selectbox("graph", [ALL_GRAPHS] + graphs, index=1, key="graph",
                         help="Pages show the runs of this graph (the newest by default).")
            counts = ov["status"]
            st.caption(" · ".join(f"{n} {k}" for k, n in counts.items() if n) or "no runs")
        if st.button("Refresh", key="refresh", help="Re-read the store (new runs of a sweep that is running)"):
            st.rerun()


def base_filters() -> tuple:
    """The sidebar's graph choice as a filter tuple."""
    graph = st.session_state.get("graph")
    return (("graph", "in", (graph,)),) if graph and graph != ALL_GRAPHS else ()


def require_runs() -> dict:
    """Stop the page with instructions when the store has no runs yet."""
    ov = q("overview")
    if not ov["runs"]:
        root = store().root
        st.info(
            f"No runs in `{root}` yet. Run a graph first, then press Refresh:\n\n"
            f"```\nvlpgraph run graphs/smoke.yaml --store {root}\n```\n\n"
            "(`graphs/timix_sweep.yaml` fills every page: ablations, data efficiency, patch heatmaps.)",
            icon=":material/info:")
        st.stop()
    return ov


def graph_label() -> str:
    graph = st.session_state.get("graph")
    return graph if graph and graph != ALL_GRAPHS else "all graphs"


def follow_default(key: str, options: list, default: list) -> None:
    """Before a multiselect with this key is drawn: until the user changes it, it shows ``default``
    (so metrics that appear while a sweep runs show up on refresh); afterwards it keeps their choice,
    minus values that are no longer among the options. Pass ``on_change=touched, args=(key,)``."""
    mine = st.session_state.get(key)
    if mine is None or not st.session_state.get(f"{key}__touched"):
        st.session_state[key] = [d for d in default if d in options]
    else:
        st.session_state[key] = [v for v in mine if v in options]


def touched(key: str) -> None:
    st.session_state[f"{key}__touched"] = True


def plain(text: str | None) -> str:
    """Text from the store (a caption) made safe to show inside Markdown: its markup characters are
    escaped, so a caption like '*big* [x](y)' shows as written."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", text or "")
