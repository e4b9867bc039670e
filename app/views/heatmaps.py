"""Patch heatmaps: which patches a model finds relevant to a caption; two runs side by side; the
mixed samples (image, partner, mixed image, λ) a mixer made."""

import pandas as pd
import streamlit as st

from vlpgraph.app import common
from vlpgraph.results import analysis, plots
from vlpgraph.store import Store


@st.cache_data(max_entries=512, show_spinner=False)
def heatmap(root: str, version: tuple, run_id: str, evaluator: str, sample_id: int, opacity: float, boxes: bool,
            title: str):
    sample = analysis.patch_sample(Store(root), run_id, evaluator, sample_id)
    if sample is None:
        return None
    return plots.heatmap_figure(sample, opacity, title, boxes)


st.title("Patch heatmaps")
common.require_runs()
base = common.base_filters()
runs = common.q("patch_runs", base)
if runs.empty:
    st.info(f"No run of {common.graph_label()} stored patch scores. Wire an `evaluator.grounding` node (its "
            "`heatmaps` param says how many test samples it stores), e.g.\n\n"
            "```\nvlpgraph run graphs/timix_sweep.yaml\n```")
    st.stop()

heat = runs[runs["kind"] == "heatmap"].reset_index(drop=True)
labels = analysis.run_labels(heat.drop_duplicates("run_id"))
keys = [f"{r}|{e}" for r, e in zip(heat["run_id"], heat["evaluator"])]


def key_label(key: str) -> str:
    run_id, evaluator = key.split("|", 1)
    return f"{labels.get(run_id, run_id)} · {evaluator}"


s = common.store()
if keys:
    c1, c2 = st.columns([3, 2])
    first = c1.selectbox("run · scorer", keys, index=len(keys) - 1, format_func=key_label, key="hm_run")
    other = c2.selectbox("side by side with", ["(none)"] + keys, format_func=lambda k: k if k == "(none)" else key_label(k),
                         key="hm_other")
    run_id, evaluator = first.split("|", 1)
    samples = common.q("patch_samples", run_id, evaluator)
    captions = dict(zip(samples["sample_id"], samples["caption"]))
    c1, c2, c3 = st.columns([3, 1, 1])
    sample_id = c1.selectbox("sample", samples["sample_id"].tolist(),
                             format_func=lambda i: f"#{i}: {captions.get(i) or ''}", key="hm_sample")
    opacity = c2.slider("overlay opacity", 0.0, 1.0, 0.5, 0.05, key="hm_opacity")
    show_boxes = c3.checkbox("ground-truth boxes", True, key="hm_boxes")
    st.markdown(f"**Caption:** {common.plain(captions.get(sample_id)) or '(none)'}")
    shown = [first] + ([other] if other != "(none)" else [])
    panels = st.columns(len(shown))
    for panel, key in zip(panels, shown):
        rid, ev = key.split("|", 1)
        fig = heatmap(str(s.root), s.version(), rid, ev, int(sample_id), opacity, show_boxes,
                              labels.get(rid, rid).split(" · ")[0] + f" · {ev}")
        with panel:
            st.caption(key_label(key))
            if fig is None:
                st.warning(f"This run did not store sample #{sample_id}.")
            else:
                st.plotly_chart(fig, key=f"hm_fig_{key}", width="content")
    st.caption("Green boxes: the objects the caption mentions. Dotted square: the highest-scoring patch "
               "(white = it touches a mentioned box, a pointing-game hit; red = a miss).")

mixed = runs[runs["kind"] == "mixed"].reset_index(drop=True)
st.subheader("Mixed samples")
if mixed.empty:
    st.caption("No run stored mixed samples (an `evaluator.grounding` with a `mixer:` input writes them).")
    st.stop()
mixed_keys = [f"{r}|{e}" for r, e in zip(mixed["run_id"], mixed["evaluator"])]
mlabels = analysis.run_labels(mixed.drop_duplicates("run_id"))
c1, c2 = st.columns([3, 2])
mkey = c1.selectbox("run", mixed_keys, index=len(mixed_keys) - 1,
                    format_func=lambda k: f"{mlabels.get(k.split('|')[0], k)} · {k.split('|')[1]}", key="hm_mixed_run")
mrun, mev = mkey.split("|", 1)
msamples = common.q("patch_samples", mrun, mev, "mixed")
mid = c2.selectbox("mixed sample", msamples["sample_id"].tolist(), key="hm_mixed_sample")
row = common.q("patch_sample", mrun, mev, int(mid), "mixed")
if row is None:
    st.warning("That mixed sample is gone (the store changed); pick another.")
    st.stop()
cols = st.columns(4)
for col, (title, blob) in zip(cols, [(f"image #{mid}", row["image"]), (f"partner #{row['partner_id']}", row["partner_image"]),
                                     ("mixed image", row["mixed_image"])]):
    if blob is not None:
        col.image(plots.upscale_png(blob), caption=title)
cols[3].metric("λ (share of the caption's own image)", f"{row['lam']:.3f}" if pd.notna(row["lam"]) else "–")
cols[3].caption(common.plain(row.get("caption")))
