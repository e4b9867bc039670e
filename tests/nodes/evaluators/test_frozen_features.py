"""Frozen-transfer features are computed once per evaluation, whichever evaluators ask, and never served
for weights other than the ones they were computed with."""

from __future__ import annotations

import torch

from tests.helpers import build, build_ctx
from vlpgraph.nodes.evaluators.evaluation import frozen_image_tokens, weights_digest

def _setup(tmp_path):
    data = build("dataset.shapes", ctx=build_ctx("shapes", cache=tmp_path), train_size=300, test_size=90, image_size=32)
    torch.manual_seed(0)
    vit = build("encoder.vit", {"data": data}, build_ctx("vision", cache=tmp_path),
                patch_size=8, width=32, depth=1, heads=2)
    calls: list[int] = []
    vit.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return data, vit, calls


def test_each_image_is_encoded_once_however_many_evaluators_ask(tmp_path):
    data, vit, calls = _setup(tmp_path)
    labelled = [i for i in range(len(data.train)) if data.train[i]["label"] >= 0]
    a = frozen_image_tokens(vit, data, data.train, labelled, batch_size=128)  # what a probe asks
    b = frozen_image_tokens(vit, data, data.train, batch_size=128)  # what transfer retrieval asks
    c = frozen_image_tokens(vit, data, data.train, range(50), batch_size=128)  # a captioner's subset
    assert sum(calls) == len(data.train)  # each training image through the encoder once
    frozen_image_tokens(vit, data, data.test, batch_size=128)
    frozen_image_tokens(vit, data, data.test, batch_size=128)
    assert sum(calls) == len(data.train) + len(data.test)
    # the rows are the same items' tokens, bit for bit, whoever asked
    assert torch.equal(a.tokens, b.tokens[labelled]) and torch.equal(c.tokens, b.tokens[:50])
    assert a.labels.tolist() == [data.train[i]["label"] for i in labelled]
    assert b.captions[7] == data.train[7]["caption"] and b.sample_ids[7] == data.train[7]["sample_id"]


def test_features_of_other_weights_are_never_served(tmp_path):
    data, vit, calls = _setup(tmp_path)
    before = frozen_image_tokens(vit, data, data.test, batch_size=64).tokens
    digest = weights_digest(vit)
    with torch.no_grad():
        vit.vit.blocks[0].mlp.fc1.weight[0, 0] += 0.5  # what one more training step does
    assert weights_digest(vit) != digest
    after = frozen_image_tokens(vit, data, data.test, batch_size=64).tokens
    assert sum(calls) == 2 * len(data.test)  # encoded again
    assert not torch.equal(before, after)
    vit.eval()
    with torch.no_grad():
        fresh = torch.cat([vit(data.collate([data.test[i] for i in range(s, min(s + 64, len(data.test)))])["images"])
                           for s in range(0, len(data.test), 64)])
    assert torch.equal(after, fresh)


def test_chunks_do_not_depend_on_which_items_were_asked_first(tmp_path):
    data, vit, _ = _setup(tmp_path)
    late = frozen_image_tokens(vit, data, data.test, [89, 3, 40], batch_size=32).tokens
    data2, vit2, _ = _setup(tmp_path)  # same weights (same seed), empty cache
    assert weights_digest(vit2) == weights_digest(vit)
    full = frozen_image_tokens(vit2, data2, data2.test, batch_size=32).tokens
    assert torch.equal(late, full[[89, 3, 40]])
