"""Validation that knows what the kinds know: static facts of the data (split sizes, image size)
checked against the nodes that use them, every problem of a node at once, and errors that name the
sweep variant they come from. Each message is asserted in full."""

from __future__ import annotations

import pytest

from vlpgraph.cli import main
from tests.engine.test_validation import GOOD, errors_of


def edited(*edits: tuple[str, str]) -> str:
    text = GOOD
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def test_patch_size_must_divide_the_data_image_size(capsys, tmp_path):
    # the ViT takes its size from the data (no image_size of its own): 40 px is not a multiple of 16
    text = edited(("{train_size: 64, test_size: 32, caption_noise: 0.2}", "{train_size: 64, test_size: 32, image_size: 40}"),
                  ("params: {image_size: 32, patch_size: 8, width: 32", "inputs: {data: shapes}\n    params: {patch_size: 16, width: 32"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == ["vlpgraph: G:10: node 'vision' (encoder.vit): patch_size 16 does not divide "
                     "the image size 40 of its data 'shapes'"], lines


def test_vit_image_size_differs_from_its_data(capsys, tmp_path):
    text = edited(("params: {image_size: 32, patch_size: 8, width: 32", "inputs: {data: shapes}\n    params: {image_size: 64, patch_size: 8, width: 32"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == ["vlpgraph: G:10: node 'vision' (encoder.vit): image_size 64 but its data "
                     "'shapes' makes 32 px images (leave image_size out to inherit it)"], lines


def test_batch_size_larger_than_the_training_split(capsys, tmp_path):
    # train_fraction 0.1 of 64 = 7 samples; the grid's 0.5 (32 samples) is fine and not reported
    text = edited(("[0.5, 1.0]", "[0.1, 0.5]"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == ["vlpgraph: G:20: node 'train' (trainer): batch_size 16 is larger than the "
                     "training split of 'shapes' (7 samples): not one step per epoch"], lines


def test_ks_beyond_the_test_set_refused(capsys, tmp_path):
    text = edited(("    inputs: {model: train, data: shapes}\n", "    inputs: {model: train, data: shapes}\n    params: {ks: [1, 500]}\n"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == ["vlpgraph: G:24: node 'retrieval' (evaluator.retrieval): ks [500] reach the size of "
                     "the test split searched ('shapes' has 32 samples): R@k is 1 for any model once k >= the number "
                     "of pairs (use smaller ks, or a larger test split)"], lines
    # max_samples narrows what is searched: k = 10 is then too large as well
    text = edited(("    inputs: {model: train, data: shapes}\n", "    inputs: {model: train, data: shapes}\n    params: {ks: [1, 10], max_samples: 10}\n"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == ["vlpgraph: G:24: node 'retrieval' (evaluator.retrieval): ks [10] reach the size of "
                     "the test split searched (max_samples 10): R@k is 1 for any model once k >= the number "
                     "of pairs (use smaller ks, or a larger test split)"], lines


def test_every_problem_of_one_node_is_reported(capsys, tmp_path):
    # two cross-param problems of one ViT (a pydantic model validator would stop at the first)
    text = edited(("params: {image_size: 32, patch_size: 8, width: 32, depth: 1, heads: 2}",
                   "params: {image_size: 36, patch_size: 8, width: 30, depth: 1, heads: 4}"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == [
        "vlpgraph: G:9: node 'vision' (encoder.vit): width (30) must be divisible by heads (4)",
        "vlpgraph: G:9: node 'vision' (encoder.vit): image_size (36) must be divisible by patch_size (8)",
    ], lines


VARIANTS = """\
  variants:
    base: {}
    zs:
      nodes:
        zs: {kind: evaluator.zeroshot, inputs: {model: train, data: shapes}, params: {batch_size: 0}}
    no_text:
      nodes:
        text: null
"""


def test_errors_name_the_variant(capsys, tmp_path):
    text = edited(("  seeds: [0, 1]\n", "  seeds: [0, 1]\n" + VARIANTS))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == [
        "vlpgraph: G:31: variant 'zs': node 'zs' (evaluator.zeroshot): param 'batch_size': input should be greater "
        "than or equal to 1 (got 0)",
        "vlpgraph: G:16: variant 'no_text': node 'itc' (objective.itc): input 'text' refers to node 'text', which "
        "variant 'no_text' deletes",
    ], lines


def test_a_problem_every_variant_has_is_not_given_a_variant(capsys, tmp_path):
    text = edited(("  seeds: [0, 1]\n", "  seeds: [0, 1]\n  variants: {a: {}, b: {vision.depth: 2}}\n"),
                  ("caption_noise: 0.2", "caption_noise: 1.5"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == ["vlpgraph: G:6: node 'shapes' (dataset.shapes): param 'caption_noise': input should be less "
                     "than or equal to 1 (got 1.5)"], lines


def test_show_prints_the_variant_names(capsys, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(edited(("  seeds: [0, 1]\n", "  seeds: [0, 1]\n  variants: {base: {}, deep: {vision.depth: 2}}\n")))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "t [base]" in out and "t [deep]" in out, out


@pytest.mark.parametrize("fraction, ok", [(0.25, True), (0.2, False)])
def test_batch_size_check_follows_train_fraction(capsys, tmp_path, fraction, ok):
    # ceil(0.25 * 64) = 16 samples: one step; ceil(0.2 * 64) = 13: none
    rc, lines = errors_of(capsys, tmp_path, edited(("[0.5, 1.0]", f"[{fraction}]")))
    assert (rc == 0) == ok, lines


def test_variants_that_train_the_same_model_are_named(capsys, tmp_path):
    # 'b' edits only an evaluator: same trainer hash, so one trial per grid point x seed; its own
    # evaluator would never run, which `validate` and `run` must say instead of leaving 'b' empty
    path = tmp_path / "g.yaml"
    path.write_text(edited(("  seeds: [0, 1]\n", "  seeds: [0, 1]\n  variants: {a: {}, b: {retrieval.ks: [1, 2]}, "
                                                  "c: {vision.depth: 2}}\n")))
    assert main(["validate", str(path)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: variant 'b' trains the same model as variant 'a' in 4 trial(s) (e.g. "
                     "shapes.train_fraction=0.5 seed=0): each runs once, as 'a', with that variant's evaluators; "
                     "to compare evaluators on one model, give them different node names in one graph"], notes


def test_static_checks_run_beside_other_problems(capsys, tmp_path):
    # a param problem in one node must not hide a size check of another: both at once
    text = edited(("patch_size: 8", "patch_size: 5"), ("batch_size: 16", "batch_size: 128"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert any("patch_size" in line for line in lines) and \
        any("batch_size 128 is larger than the training split" in line for line in lines), lines
