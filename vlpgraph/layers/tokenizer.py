"""A WordPiece tokenizer (HuggingFace ``tokenizers``) behind the :class:`vlpgraph.engine.ports.Tokenizer` interface.

BERT-style: NFD + lowercase + accent stripping (``BertNormalizer``), whitespace and punctuation
splitting (``BertPreTokenizer``), WordPiece with ``##`` continuations, ``[CLS] text [SEP]``.
Either trained on captions (cached on disk by content hash) or read from a local ``tokenizer.json``.

Extra special tokens (the language model's image tokens ``<soi> <img> <eoi>``, :data:`IMAGE_TOKENS`) are
plain vocabulary entries, never registered as tokenizers' "added tokens": added tokens are matched in the
raw text, so a caption containing the string ``<soi>`` would become the special id. As vocabulary
entries they can never come out of text (the pre-tokeniser splits ``<`` and ``>`` off as punctuation, so
no pre-tokenised word is ever ``<soi>``) and are never split (code inserts their ids directly, e.g.
vlpgraph.layers.interleaved). A tokenizer trained without extras is exactly what it was before.
"""

from __future__ import annotations

from collections import Counter

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from vlpgraph.errors import UserError
from vlpgraph.engine.ports import Tokenizer

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# start of image, one image placeholder (replaced by a visual token), end of image (encoder.lm)
SOI, IMG, EOI = "<soi>", "<img>", "<eoi>"
IMAGE_TOKENS = (SOI, IMG, EOI)
# bump when the training recipe changes, so old cache files are not reused for a new recipe
RECIPE = "wordpiece-bert-lowercase-v2-words"


def training_hash(captions: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> str:
    """Content hash of what a trained tokenizer depends on: the captions, the vocab cap, the specials."""
    h = hashlib.sha256()
    h.update(f"{RECIPE}\0{vocab_size}\0{len(special_tokens)}\0".encode())
    for t in special_tokens:
        h.update(t.encode() + b"\0")
    n = 0
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no separator ambiguity
        h.update(b)
        n += 1
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()[:32]


def train_wordpiece(captions: Sequence[str], vocab_size: int, extra_specials: Sequence[str] = ()) -> HFTokenizer:
    """A lowercase BERT-style WordPiece for ``captions`` (vocab at most ``vocab_size``).

    Vocabulary: the specials (:data:`SPECIAL_TOKENS`, then ``extra_specials`` in order), every character seen (alone and as a ``##`` continuation, so any word
    can be spelled) and then the most frequent whole words (ties broken alphabetically). Not
    tokenizers' WordPieceTrainer: its merges tie-break differently from run to run (seen here: 6
    different vocabularies from 6 runs on the same captions), and a trial must be reproducible.
    Encoding is tokenizers' own WordPiece model, normaliser and pre-tokeniser.
    """
    tok = HFTokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    counts: Counter[str] = Counter()
    for c in captions:
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(c)))
    chars = sorted({ch for w in counts for ch in w})
    specials = _specials(extra_specials)
    base = list(specials) + chars + ["##" + ch for ch in chars]
    room = max(0, vocab_size - len(base))
    frequent = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    words = sorted([w for w, _ in frequent if len(w) > 1 and w not in base][:room])
    vocab = base + words
    tok.model = models.WordPiece(
        {t: i for i, t in enumerate(vocab)}, unk_token=UNK, max_input_chars_per_word=100, continuing_subword_prefix="##"
    )
    return tok


def _specials(extra_specials: Sequence[str]) -> tuple[str, ...]:
    """SPECIAL_TOKENS followed by ``extra_specials`` (checked: distinct, not standard, not text-like)."""
    extra = tuple(extra_specials)
    if len(set(extra)) != len(extra) or set(extra) & set(SPECIAL_TOKENS):
        raise ValueError(f"extra special tokens must be distinct and not among {SPECIAL_TOKENS}: {extra}")
    # a special that the pre-tokeniser keeps as one word could be produced from text: refuse it
    plain = [t for t in extra if len(pre_tokenizers.BertPreTokenizer().pre_tokenize_str(t)) == 1]
    if plain:
        raise ValueError(f"extra special tokens must contain punctuation (e.g. <soi>), else text could "
                         f"produce them: {plain}")
    return SPECIAL_TOKENS + extra


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``: a reader never
    sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cached_wordpiece(captions: Sequence[str], vocab_size: int, cache_root: Path, log=print,
                     extra_specials: Sequence[str] = ()) -> tuple[HFTokenizer, Path]:
    """The WordPiece for ``captions`` (with ``extra_specials``, see :func:`train_wordpiece`): read from
    ``cache_root/tokenizers/<hash>.json`` when present, else trained and written there atomically. The
    specials are part of the hash; without extras the hash is the one it always was."""
    key = training_hash(captions, vocab_size, _specials(extra_specials))
    path = Path(cache_root) / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            tok = HFTokenizer.from_file(str(path))
            log(f"tokenizer: reused {path}")
            return tok, path
        except Exception as e:  # a corrupt cache entry is retrained, never trusted
            log(f"tokenizer: cached file {path} unreadable ({e}); retraining")
    if not captions:
        raise UserError("encoder.text: the data has no training captions to train a tokenizer on")
    tok = train_wordpiece(captions, vocab_size, extra_specials)
    atomic_write_text(path, tok.to_str())
    log(f"tokenizer: trained WordPiece (vocab {tok.get_vocab_size()}) on {len(captions)} captions -> {path}")
    return tok, path


def load_tokenizer_file(path: str | Path) -> HFTokenizer:
    """A tokenizer from a local ``tokenizer.json``; UserError when it is missing or unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"encoder.text: tokenizer file not found: {p}")
    try:
        return HFTokenizer.from_file(str(p))
    except Exception as e:
        raise UserError(f"encoder.text: cannot read tokenizer {p}: {str(e).splitlines()[0] if str(e) else e}")


class WordPieceTokenizer(Tokenizer):
    """``ports.Tokenizer`` over a ``tokenizers.Tokenizer``: ``[CLS] ... [SEP]``, truncated to ``max_len``
    (SEP kept last), padded with ``[PAD]`` to the longest caption of the batch.

    ``extra_specials``: tokens the vocabulary must hold besides the standard ones (UserError when it
    lacks one); each one's id is in ``special_ids``, and with :data:`IMAGE_TOKENS` the tokenizer also
    has ``soi_id``, ``img_id``, ``eoi_id``. ``pieces(texts)`` gives each text's ids with no specials,
    no truncation and no padding (for callers that assemble sequences themselves).
    """

    def __init__(self, tok: HFTokenizer, max_len: int, extra_specials: Sequence[str] = ()):
        if max_len < 3:
            raise ValueError("max_len must be at least 3 ([CLS], one token, [SEP])")
        ids = {t: tok.token_to_id(t) for t in (PAD, CLS, SEP, MASK)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"encoder.text: tokenizer lacks the special tokens {', '.join(missing)}")
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = ids[PAD], ids[CLS], ids[SEP], ids[MASK]
        self.special_ids = {t: tok.token_to_id(t) for t in extra_specials}
        missing = [t for t, i in self.special_ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {', '.join(missing)} (a tokenizer.json for "
                            "this node must have them in its vocabulary)")
        if set(IMAGE_TOKENS) <= set(self.special_ids):
            self.soi_id, self.img_id, self.eoi_id = (self.special_ids[t] for t in IMAGE_TOKENS)
        self.max_len = int(max_len)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # The hash covers the tokenizer itself (without runtime padding/truncation) and max_len,
        # i.e. everything __call__'s output depends on.
        tok.no_padding()
        tok.no_truncation()
        self.content_hash = hashlib.sha256(f"{tok.to_str()}\0{self.max_len}".encode()).hexdigest()[:32]
        self._plain = HFTokenizer.from_str(tok.to_str())  # no template, truncation or padding: pieces()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}",
            special_tokens=[(CLS, self.cls_id), (SEP, self.sep_id)],
        )
        tok.enable_truncation(max_length=self.max_len)
        tok.enable_padding(pad_id=self.pad_id, pad_token=PAD)
        self.tok = tok

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        if len(captions) == 0:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        encs = self.tok.encode_batch(list(captions))
        return {
            "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        }

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's WordPiece ids: no [CLS]/[SEP], not truncated, not padded."""
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len}, hash={self.content_hash[:8]})"


def node_wordpiece(tokenizer_file: str | None, data, vocab_size: int, ctx, who: str,
                   extra_specials: Sequence[str] = ()) -> HFTokenizer:
    """The WordPiece a node with a tokenizer uses (encoder.text, encoder.lm, decoder.caption): the local
    ``tokenizer_file`` (relative to the graph file's folder) when given, else one trained on ``data``'s
    training captions and cached by content hash. ``who``: "node 'x' (kind)" for the error without data."""
    from vlpgraph.files.local import resolve_path

    if tokenizer_file:
        return load_tokenizer_file(resolve_path(tokenizer_file, ctx.base_dir))
    if data is None:
        raise UserError(f"{who}: needs a data input to train its tokenizer on")
    hf_tok, _ = cached_wordpiece(list(data.train_captions()), vocab_size, ctx.cache_root, ctx.log,
                                 extra_specials=extra_specials)
    return hf_tok
