"""Build a CLIPTokenizer for the shapes world offline: every world word is one token.

    python tools/shapes/build_tokenizer.py --out assets/shapes-teacher/tokenizer

vocab.json / merges.txt are written in CLIP's BPE format: single characters, every intermediate merge and every
whole word (with CLIP's '</w>' end-of-word marker), plus <|startoftext|> (bos), <|endoftext|> (eos and pad, the SD1
convention) and <|unk|>. Merges are grown until BPE turns every world word into exactly one token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from stepdistill.data.shapes import all_words, max_caption_words, shapes_prompts  # noqa: E402

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MODEL_MAX_LENGTH = 24


def _bpe(word: str, ranks: dict) -> list:
    """CLIP's BPE on one word (same algorithm as transformers' CLIPTokenizer.bpe)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, _ = min(pairs)
        if rank == float("inf"):
            break
        a, b = min(((parts[i], parts[i + 1]) for r, i in pairs if r == rank))
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab(words):
    merges: list = []
    ranks: dict = {}
    changed = True
    while changed:  # grow merges until every word is one token
        changed = False
        for w in words:
            parts = _bpe(w, ranks)
            while len(parts) > 1:
                pair = (parts[0], parts[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    changed = True
                parts = _bpe(w, ranks)
    tokens = [BOS, EOS, UNK]
    chars = sorted({c for w in words for c in w})
    tokens += chars + [c + "</w>" for c in chars]
    for a, b in merges:
        tokens.append(a + b)
    seen, vocab = set(), {}
    for t in tokens:
        if t not in seen:
            seen.add(t)
            vocab[t] = len(vocab)
    return vocab, merges


def build_tokenizer(out: str):
    from transformers import CLIPTokenizer

    words = all_words()
    vocab, merges = build_vocab(words)
    with tempfile.TemporaryDirectory() as tmp:
        vf, mf = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vf, "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(mf, "w") as f:
            f.write("#version: 0.2\n")
            for a, b in merges:
                f.write(f"{a} {b}\n")
        tok = CLIPTokenizer(vf, mf, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
                            model_max_length=MODEL_MAX_LENGTH)
        os.makedirs(out, exist_ok=True)
        tok.save_pretrained(out)
        for fn in (vf, mf):  # keep the plain BPE files next to tokenizer.json
            with open(fn) as src, open(os.path.join(out, os.path.basename(fn)), "w") as dst:
                dst.write(src.read())
    tok = CLIPTokenizer.from_pretrained(out)
    verify(tok)
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges, model_max_length {tok.model_max_length} -> {out}")
    return tok


def verify(tok):
    for w in all_words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids, tok.convert_ids_to_tokens(ids))
    assert max_caption_words() + 2 <= tok.model_max_length
    for cap in shapes_prompts("train", 200):
        ids = tok(cap).input_ids
        assert len(ids) == len(cap.split()) + 2, (cap, ids)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True).strip() == cap, (cap, tok.decode(ids))
    enc = tok("", padding="max_length", max_length=tok.model_max_length)
    assert len(enc.input_ids) == tok.model_max_length


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/shapes-teacher/tokenizer")
    build_tokenizer(p.parse_args().out)
