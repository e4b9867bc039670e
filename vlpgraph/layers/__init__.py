"""Model building blocks that several node kinds share (as timm's ``layers/``).

- :mod:`.attention`: ``attend()``, the one attention function (xformers | sdpa | math) every tower uses
- :mod:`.fusion`: ALBEF's fusion encoder layers and BERT's token head
- :mod:`.decoder`: the causal caption decoder (uni-modal, then multimodal layers) and its generation
- :mod:`.masking`: MAE's per-sample random patch masking and patch/pixel helpers
- :mod:`.pooling`: attentive pooling (one learned query over a set of tokens)
- :mod:`.patches`: patch labels from boxes, grounding metrics, PNG encoding
- :mod:`.mixing`: what every image mixer shares (draws, ramps, window sums, soft targets)
- :mod:`.tokenizer`: the WordPiece tokenizer behind ``ports.Tokenizer``
- :mod:`.interleaved`: interleaved documents -> LM sequences with `<soi> <img>×n <eoi>` blocks, and placing visual tokens
- :mod:`.temperature`: the learnable, clamped contrastive temperature τ (objective.itc, .lcl, .cmcl)
- :mod:`.distributed`: cross-rank gathers with gradient for losses over the global batch (``torchrun``)

A block used by one node kind only stays in that node's module; node modules never import each other,
so what two of them share lives here (or, for evaluators, in :mod:`vlpgraph.nodes.evaluators.evaluation`).
"""
