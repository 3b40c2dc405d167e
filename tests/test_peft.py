"""A LoRA fine-tuned transformer (peft) prunes, saves and writes back: the adapters' rank and widths are
channels like any other, and the written-back PeftModel computes what the pruned network does."""
from __future__ import annotations

import pytest
import torch

import amc

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _lora_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    base = transformers.BertForSequenceClassification(config).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value", "intermediate.dense"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as after fine-tuning (peft starts B at zero: the adapter would do nothing)
            p.data.normal_()
    inputs = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return model.eval(), inputs


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits


@pytest.mark.parametrize("fmt", ["json", "pkl"])
def test_lora_model_prunes_and_round_trips(fmt: str, tmp_path) -> None:
    model, kw = _lora_bert()
    hard = amc.prune(model, 0.5, example_kwargs=kw)
    soft = amc.prune(model, 0.5, example_kwargs=kw, mode="soft")
    assert amc.count(hard, **kw)[0] < 0.35 * amc.count(model, **kw)[0]
    torch.testing.assert_close(_logits(hard(**kw)), _logits(soft(**kw)), rtol=1e-4, atol=1e-5)
    path = str(tmp_path / f"net.{fmt}")
    hard.save(path)
    torch.testing.assert_close(_logits(amc.load(path)(**kw)), _logits(hard(**kw)), rtol=0, atol=0)


def test_lora_model_writes_back_and_merges() -> None:
    """to_module refused it ('computes something else', max difference 1.8e-4): the attention read its
    head size from the LoRA wrapper's stale out_features, so the softmax scale was the unpruned one."""
    model, kw = _lora_bert()
    net = amc.prune(model, 0.5, example_kwargs=kw)
    eager = amc.export.to_module(net, model, **kw)
    torch.testing.assert_close(_logits(eager(**kw)), _logits(net(**kw)), rtol=1e-4, atol=1e-5)
    attention = eager.base_model.model.bert.encoder.layer[0].attention.self
    q = attention.query
    assert (q.in_features, q.out_features) == tuple(q.base_layer.weight.shape[::-1]) == (32, 32)
    assert attention.attention_head_size == 8
    merged = eager.merge_and_unload()  # peft's own merge of the pruned adapters into the pruned layers
    torch.testing.assert_close(_logits(merged(**kw)), _logits(net(**kw)), rtol=1e-4, atol=1e-5)
