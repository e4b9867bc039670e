"""The Samples page on VLMixer's rows: a test caption mixed by cross-modal CutMix ('cmc', evaluator.mixing) with
its regions in place of the words they replaced, and the probes' test items ('qa', 'nlvr') with the model's
answer beside the true one; the pure helpers in vlpgraph.results.analysis behind them."""

from __future__ import annotations

import numpy as np
import torch

from tests.app.test_samples import capture_media, caption_rows, open_samples, pixels, run, start, text
from vlpgraph.results import analysis
from vlpgraph.layers.patches import png_bytes
from vlpgraph.store import Store

MIXED = "there is a big [red circle #17] left of a [blue square #4] ."
ORIGINAL = "there is a big red circle left of a blue square."
SPANS = [{"concept": "red circle", "region": 17, "source_image": 3, "box": [2.0, 4.0, 12.0, 14.0], "start": 5,
          "n_visual": 1},
         {"concept": "blue square", "region": 4, "source_image": 9, "box": [0.0, 0.0, 8.0, 8.0], "start": 9,
          "n_visual": 1}]


def regions(n: int, size: int = 16) -> tuple[bytes, list[np.ndarray]]:
    """A strip of n random regions side by side (as mixer.cmc stores them), and each region's pixels."""
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))
    return png_bytes(torch.cat(list(images), dim=2)), [pixels(png_bytes(im)) for im in images]


def cmc_row(sample_id: int) -> dict:
    strip, _ = regions(2)
    return dict(kind="cmc", sample_id=sample_id, text=MIXED, reference=ORIGINAL, image=strip,
                info={"rate": 0.5, "spans": SPANS})


def picture(seed: int, width: int = 16) -> bytes:
    return png_bytes(np.random.default_rng(seed).random((16, width, 3)))


def qa_rows() -> list[dict]:
    return [dict(kind="qa", sample_id=0, text="3", reference="2", image=picture(1),
                 info={"question": "how many red shapes are there?", "type": "count", "correct": False,
                       "image_index": 5}),
            dict(kind="qa", sample_id=1, text="yes", reference="yes", image=picture(2),
                 info={"question": "is there a blue square?", "type": "exists", "correct": True, "image_index": 5})]


def nlvr_row() -> dict:
    return dict(kind="nlvr", sample_id=0, text="true", reference="true", image=picture(3, 34),
                info={"statement": "the left image has more circles than the right image", "type": "compare",
                      "correct": True, "left": 4, "right": 11})


def elements(node):
    """The page's elements in the order they are drawn (columns left to right)."""
    children = getattr(node, "children", None)
    if children is None:
        yield node
        return
    for key in sorted(children):
        yield from elements(children[key])


def test_cmc_parts_put_each_region_where_its_words_were():
    parts = analysis.cmc_parts(MIXED, {"spans": SPANS})
    assert [p.get("text", p.get("concept")) for p in parts] == \
        ["there is a big", "red circle", "left of a", "blue square", "."]
    assert [p["region"] for p in parts if "region" in p] == [0, 1]  # their places in the strip
    assert parts[1]["label"] == "region #17 of image 3 · box 2, 4, 12, 14"
    # a span whose marker is not in the text still shows, after the sentence
    lost = analysis.cmc_parts("a sentence", {"spans": SPANS[:1]})
    assert [p.get("text", p.get("concept")) for p in lost] == ["a sentence", "red circle"]
    assert analysis.concept_marks(ORIGINAL, ["red circle", "blue square"]) == [
        ("there is a big ", False), ("red circle", True), (" left of a ", False), ("blue square", True), (".", False)]


def test_answer_parts_say_question_answers_and_verdict():
    qa = analysis.answer_parts({**qa_rows()[0], "references": ["2"]})
    assert (qa["prompt_label"], qa["prompt"], qa["predicted"], qa["truth"], qa["correct"], qa["type"]) == \
        ("question", "how many red shapes are there?", "3", "2", False, "count")
    assert qa["image_caption"] == "test image 5"
    nlvr = analysis.answer_parts({**nlvr_row(), "references": ["true"]})
    assert nlvr["prompt_label"] == "statement" and nlvr["correct"] is True
    assert nlvr["image_caption"] == "left: test image 4 · right: test image 11"
    # without the evaluator's verdict: the answers compared
    bare = analysis.answer_parts({"kind": "qa", "text": "red", "references": ["blue"], "info": {"question": "q"}})
    assert bare["correct"] is False


def test_a_mixed_caption_shows_its_regions_in_place_with_their_concepts(tmp_path, monkeypatch):
    s = Store(tmp_path / "store")
    start(s, "vlm-run", "cmc")
    s.log_evaluation("vlm-run", 9, "mixing", None, {"rate": 0.5}, sample_rows=[cmc_row(0)])
    s.log_evaluation("vlm-run", 9, "captioning", None, {"cider": 0.9}, headline="cider",
                     sample_rows=caption_rows("vlm", 9, (0,)))
    files = capture_media(monkeypatch)
    at = open_samples(s.root, monkeypatch)
    assert not at.radio  # the mixed caption is test sample 0's: shown with its generated caption
    page = text(at)
    assert "generated by vlm at step 9 for sample 0" in page
    # the sentence in reading order, each region where its words were, titled with its concept
    drawn = []
    for el in elements(at.main):
        if el.type == "markdown" and el.value.replace("\\", "") in ("there is a big", "left of a", "."):
            drawn.append(el.value.replace("\\", ""))
        elif el.type == "image":
            drawn += [img.caption for img in el.proto.imgs]
    assert drawn == ["there is a big", "red circle", "left of a", "blue square", "."]
    # the regions are the strip's tiles, in span order (the page enlarges them by an integer factor)
    _, want = regions(2)
    shown = [pixels(next(d for fid, d in files.items() if fid in img.url)) for el in at.get("image")
             for img in el.proto.imgs]
    assert len(shown) == 2
    for got, exp in zip(shown, want):
        k = got.shape[0] // 16
        assert np.array_equal(got[::k, ::k], exp)
    # the original with the replaced words marked, and where each region came from
    assert "original: there is a big :orange-background[red circle] left of a :orange-background[blue square]." in page
    assert "red circle: region #17 of image 3" in page and "replaced 50% of the concept spans" in page


def test_qa_and_nlvr_items_show_prompt_answers_and_verdict_apart_from_test_samples(tmp_path, monkeypatch):
    s = Store(tmp_path / "store")
    start(s, "vlm-run", "cmc")
    s.log_evaluation("vlm-run", 9, "qa", None, {"accuracy": 0.5}, headline="accuracy", sample_rows=qa_rows())
    s.log_evaluation("vlm-run", 9, "nlvr", None, {"accuracy": 1.0}, headline="accuracy", sample_rows=[nlvr_row()])
    s.log_evaluation("vlm-run", 9, "captioning", None, {"cider": 0.9}, headline="cider",
                     sample_rows=caption_rows("vlm", 9, (0,)))
    files = capture_media(monkeypatch)
    at = open_samples(s.root, monkeypatch)
    # question 0 is about test image 5, not test sample 0: each group is shown on its own
    assert at.radio(key="sm_what").options == ["test samples", "test questions", "test image pairs"]
    assert "how many" not in text(at)
    at.radio(key="sm_what").set_value("test questions")
    page = text(run(at))
    assert "generated by vlm" not in page
    assert "qa · qa · type: count" in page
    assert "question: how many red shapes are there?" in page
    assert "model: 3 :red[✗ wrong]" in page and "true: 2" in page
    [(caption, image)] = [(img.caption, pixels(next(d for fid, d in files.items() if fid in img.url)))
                          for el in at.get("image") for img in el.proto.imgs]
    assert caption == "test image 5"
    assert np.array_equal(image[:: image.shape[0] // 16, :: image.shape[0] // 16], pixels(picture(1)))
    assert at.selectbox(key="sm_sample:test questions").options == ["#0 · qa · 2", "#1 · qa · yes"]
    at.selectbox(key="sm_sample:test questions").set_value(1)
    page = text(run(at))
    assert "model: yes :green[✓ right]" in page and "wrong" not in page
    at.radio(key="sm_what").set_value("test image pairs")
    page = text(run(at))
    assert "statement: the left image has more circles than the right image" in page
    assert "model: true :green[✓ right]" in page and "true: true" in page
    [img] = [img for el in at.get("image") for img in el.proto.imgs]
    assert img.caption == "left: test image 4 · right: test image 11"
    both = pixels(next(d for fid, d in files.items() if fid in img.url))
    k = both.shape[0] // 16
    assert np.array_equal(both[::k, ::k], pixels(picture(3, 34)))  # both images, side by side as stored
