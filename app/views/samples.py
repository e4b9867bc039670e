"""Samples: what evaluators stored to look at (the store's ``samples`` table) for a run and a test sample —
the image, the masked view and the MAE reconstruction; generated vs reference captions; a test caption
mixed by cross-modal CutMix (the regions that replaced its words in their place); held-out interleaved
documents as the language model read them (images inline, ``<soi>`` positions marked); test questions and
image pairs with the model's answer beside the true one; a second run side by side on the same sample.
Rows whose ids number something other than test samples (questions, image pairs, documents) are shown
apart (analysis.sample_group). A kind this page does not know is shown generically (images, text,
reference, info)."""

import streamlit as st

from vlpgraph.app import common
from vlpgraph.results import analysis, plots

NONE = "(none)"
ALL_VARIANTS = "(all variants)"
IMAGES = ("image", "masked_image", "output_image")
# How each kind's fields are titled; any other kind gets the column names.
LABELS = {
    "reconstruction": {"image": "image", "masked_image": "masked view (what the encoder saw)",
                       "output_image": "MAE reconstruction", "text": "output", "references": "reference"},
    "caption": {"image": "image", "text": "generated", "references": "reference"},
}
# about how many characters of text fill a line of a sample's panel (a mixed sentence is laid out in columns)
LINE_CHARS = 110
DEFAULT_LABELS = {"image": "image", "masked_image": "masked_image", "output_image": "output_image", "text": "text",
                  "references": "reference"}


def show_document(row: dict) -> None:
    """A held-out document (evaluator.documents): its sentences and images in reading order, each image
    with where its <soi> stands and what the contrastive term made of it."""
    info = row["info"]
    tiles = plots.png_tiles(row["image"], int(info["tile"])) if row.get("image") is not None else []
    head = f"**{common.plain(row['evaluator'])}** · document · {info.get('tokens', '?')} tokens"
    st.markdown(head + (" · truncated" if info.get("truncated") else ""))
    for part in analysis.document_parts(info):
        if "text" in part:
            st.markdown(common.plain(part["text"]))
            continue
        left, right = st.columns([1, 5], vertical_alignment="center")
        if part["image"] < len(tiles):
            left.image(plots.upscale_png(tiles[part["image"]], 96), output_format="PNG")
        right.markdown(f":blue-background[image {part['image'] + 1}] {common.plain(part['label'])}")


def show_cmc(row: dict) -> None:
    """A test caption mixed by cross-modal CutMix (evaluator.mixing): the kept words and, in place of each
    replaced span, the region that replaced it titled with its concept; then the original sentence with
    the replaced words marked."""
    info = row["info"]
    strip = row.get("image")
    tiles = plots.png_tiles(strip, plots.png_array(strip).shape[0]) if strip is not None else []
    st.markdown(f"**{common.plain(row['evaluator'])}** · cmc · the test caption as the mixer mixes it")
    parts = analysis.cmc_parts(row.get("text") or "", info)
    # one column per part, as wide as its characters (a region ~ 8 characters), the rest of the line left
    # empty: the sentence reads left to right with the pictures where the words were
    widths = [len(p["text"]) + 2 if "text" in p else 8 for p in parts]
    spacer = [LINE_CHARS - sum(widths)] if sum(widths) < LINE_CHARS else []
    for col, part in zip(st.columns(widths + spacer or [1], gap="small", vertical_alignment="center"), parts):
        if "text" in part:
            col.markdown(common.plain(part["text"]))
        elif part["region"] < len(tiles):
            col.image(plots.upscale_png(tiles[part["region"]], 64), caption=part["concept"], output_format="PNG")
        else:
            col.markdown(f":orange-background[{common.plain(part['concept'])}]")
    refs = row["references"]
    if refs:
        concepts = [p["concept"] for p in parts if "region" in p]
        marked = "".join(f":orange-background[{common.plain(w)}]" if replaced else common.plain(w)
                         for w, replaced in analysis.concept_marks(refs[0], concepts))
        st.markdown(f"original: {marked}")
    regions = " · ".join(f"{p['concept']}: {p['label']}" for p in parts if "region" in p)
    rate = info.get("rate")
    st.caption(regions + (f" · replaced {rate:.0%} of the concept spans of its batch" if rate is not None else ""))


def show_answer(row: dict) -> None:
    """A probe's test item (evaluator.qa's question, evaluator.nlvr's statement about two images): the
    picture, the prompt, the model's answer marked right or wrong, the true answer, the question type."""
    parts = analysis.answer_parts(row)
    head = f"**{common.plain(row['evaluator'])}** · {common.plain(row['kind'])}"
    st.markdown(head + (f" · type: {common.plain(parts['type'])}" if parts["type"] else ""))
    left, right = st.columns([2, 3], vertical_alignment="center")
    if row.get("image") is not None:
        left.image(plots.upscale_png(row["image"]), caption=parts["image_caption"], output_format="PNG")
    mark = {True: ":green[✓ right]", False: ":red[✗ wrong]", None: ""}[parts["correct"]]
    right.markdown(f"{parts['prompt_label']}: **{common.plain(parts['prompt'])}**")
    right.markdown(f"model: **{common.plain(parts['predicted'])}** {mark}")
    right.markdown(f"true: {common.plain(parts['truth'])}")


def show_row(row: dict) -> None:
    """One (evaluator, kind) row of a sample: its images in a row, its text beside its reference(s),
    then its info (scalars on a line, anything nested as JSON)."""
    special = {"document": show_document, "cmc": show_cmc, "qa": show_answer, "nlvr": show_answer}
    if row["kind"] in special:
        special[row["kind"]](row)
        return
    labels = {**DEFAULT_LABELS, **LABELS.get(row["kind"], {})}
    st.markdown(f"**{common.plain(row['evaluator'])}** · {common.plain(row['kind'])}")
    images = [(labels[c], row[c]) for c in IMAGES if row.get(c) is not None]
    if images:
        for col, (title, blob) in zip(st.columns(len(images)), images):
            # PNG, not Streamlit's default JPEG re-encoding: a reconstruction is compared pixel by pixel
            col.image(plots.upscale_png(blob), caption=title, output_format="PNG")
    if row.get("text") is not None:
        st.markdown(f"{labels['text']}: **{common.plain(row['text'])}**")
    refs = row["references"]
    if len(refs) == 1:
        st.markdown(f"{labels['references']}: {common.plain(refs[0])}")
    elif refs:
        st.markdown(f"{labels['references']}s ({len(refs)}):\n" + "".join(f"\n- {common.plain(r)}" for r in refs))
    info = row["info"]
    scalars = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if scalars:
        st.caption(" · ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in scalars.items()))
    nested = {k: v for k, v in info.items() if k not in scalars}
    if nested:
        st.json(nested, expanded=False)


st.title("Samples")
common.require_runs()
base = common.base_filters()
runs = common.q("sample_runs", base)
if runs.empty:
    st.info(f"No run of {common.graph_label()} stored samples. Evaluators write them: `evaluator.reconstruction` "
            "(the image, its masked view and the MAE reconstruction), `evaluator.captioning` (generated captions "
            "beside their references), `evaluator.documents` (held-out interleaved documents), `evaluator.mixing` "
            "(test captions mixed by cross-modal CutMix) and `evaluator.qa` / `evaluator.nlvr` (test questions with "
            "the model's answers), e.g.\n\n"
            "```\nvlpgraph run graphs/mug.yaml\nvlpgraph run graphs/lcl.yaml\n```", icon=":material/info:")
    st.stop()

labels = analysis.run_labels(runs)
kinds = dict(zip(runs["run_id"], runs["kinds"]))

# ---- which run, step and sample
c1, c2, c3, c4 = st.columns([1, 3, 1, 3])
variants = sorted(set(runs["variant"].dropna()))
variant = c1.selectbox("variant", [ALL_VARIANTS] + variants, key="sm_variant")
shown = runs if variant == ALL_VARIANTS else runs[runs["variant"] == variant]
run_ids = shown["run_id"].tolist()
run_id = c2.selectbox("run", run_ids, index=len(run_ids) - 1, key="sm_run",
                      format_func=lambda r: f"{labels.get(r, r)} · {kinds[r]}")
steps = common.q("sample_steps", run_id)
step = c3.selectbox("step", steps, key="sm_step", help="the evaluation step (latest first)")
others = [r for r in runs["run_id"] if r != run_id]
other = c4.selectbox("side by side with", [NONE] + others, key="sm_other",
                     format_func=lambda r: r if r == NONE else labels.get(r, r))

table = common.q("sample_table", run_id, int(step))
# questions, image pairs and held-out documents are numbered apart from the test samples: one group at a time
stored = set(table["kind"].map(analysis.sample_group))
groups = [g for g in analysis.SAMPLE_GROUPS if g in stored]
group = groups[0]
if len(groups) > 1:
    group = st.radio("show", groups, horizontal=True, key="sm_what")
table = table[table["kind"].map(analysis.sample_group) == group]
ids = sorted(set(table["sample_id"].astype(int)))
other_step = None
if other != NONE:
    # the second run at the same step when it has one, else at its latest
    other_steps = common.q("sample_steps", other)
    other_step = step if step in other_steps else other_steps[0]
    other_table = common.q("sample_table", other, int(other_step))
    other_table = other_table[other_table["kind"].map(analysis.sample_group) == group]
    both = [i for i in ids if i in set(other_table["sample_id"].astype(int))]
    if both:
        ids = both
    else:
        st.warning("The two runs stored no sample in common; showing the first run's samples.")
sample_names = analysis.sample_labels(table)
# a picker per group: its ids number other things (a keyed widget keeps its identity when its options change,
# and the browser would go on showing the other group's label for the same id)
sample_key = "sm_sample" if group == analysis.SAMPLE_GROUPS[0] else f"sm_sample:{group}"
sample_id = st.selectbox("sample", ids, key=sample_key, format_func=lambda i: sample_names.get(i, f"#{i}"),
                         help=f"{group} the evaluators stored (with a second run: those both stored)")

# ---- the sample, one panel per run
panels = [(run_id, step)] + ([(other, other_step)] if other != NONE else [])
for panel, (rid, at_step) in zip(st.columns(len(panels)), panels):
    with panel:
        st.caption(f"{labels.get(rid, rid)} · step {at_step}")
        rows = [r for r in common.q("sample_detail", rid, int(at_step), int(sample_id))
                if analysis.sample_group(r["kind"]) == group]
        if not rows:
            st.warning(f"This run did not store sample #{sample_id} at step {at_step}.")
        for row in rows:
            show_row(row)

with st.expander(f"Every stored sample of this run at step {step} ({len(table)} rows)"):
    st.dataframe(table[["sample_id", "evaluator", "kind", "text", "reference"]], hide_index=True, key="sm_table")
