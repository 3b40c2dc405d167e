"""Token pruning (APT, seed 000): agents insert on real ViT layouts, tokens really shrink, training moves both
the agents and the model, batched and dynamic modes, save/load, and bad input fails loudly."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.compressors import TokenPruning
from amc.compressors.tokens import TokenAgent, agents_of, dynamic_macs, find_blocks, keep_top, set_mode
from amc.errors import ExportError, PruningError, TrainingError
from amc.models import create


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return create("vit_digits", image_size=8, dim=24, depth=4, heads=2).eval()  # 16 tokens + CLS


def _tv_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=4, num_heads=2,
                                                hidden_dim=24, mlp_dim=48, num_classes=10).eval()


MODELS = {"timm_style": (_tiny_vit, (1, 8, 8)), "torchvision": (_tv_vit, (3, 16, 16))}


def _loader(shape, n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _token_counts(net, x):
    seen = []
    hooks = [a.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for a in agents_of(net)]
    try:
        out = net(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_agents_insert_and_tokens_shrink(name):
    build, shape = MODELS[name]
    model = build()
    loader = _loader(shape)
    c = TokenPruning(model, loader, target_macs=0.75, epochs=0)
    net = c.compress()
    assert len(agents_of(net)) == 2  # 4 blocks: the seed's 2/5/8 of 12 -> after blocks 1 and 2
    n = find_blocks(c.origin_graph)[0].tokens
    for b in (1, 7):
        x = torch.randn(b, *shape)
        out, counts = _token_counts(net, x)
        assert out.shape == model(x).shape
        assert counts == [k + 1 for k in c.keep]
        assert n > counts[0] > counts[1] >= 2  # tokens shrink layer by layer
        set_mode(net, "dynamic")
        out_d, counts_d = _token_counts(net, x)
        set_mode(net, "batched")
        assert out_d.shape == out.shape and all(1 < k <= n for k in counts_d)
    x1 = torch.randn(1, *shape)
    macs_after, macs_before = amc.count(net, x1)[0], amc.count(model, x1)[0]
    assert macs_after <= 0.75 * macs_before
    assert macs_after > 0.6 * macs_before  # the budget is met, not overshot to nothing


def test_training_step_changes_agents_and_model_and_eval_is_deterministic():
    model = _tiny_vit()
    loader = _loader((1, 8, 8), n=16)
    c = TokenPruning(model, loader, target_macs=0.7, epochs=1, lr=1e-3, agent_lr=1e-2)
    net = c.compress()
    before = dict(amc.trace(model, torch.randn(1, 1, 8, 8)).named_parameters())
    moved = {k for k, p in net.named_parameters() if k in before and not torch.equal(p, before[k])}
    assert any("blocks" in k for k in moved), "the model was not trained jointly"
    fresh = TokenAgent(agents_of(net)[0].dim)
    trained = agents_of(net)[0]
    assert not torch.equal(trained.mlp[0].weight, fresh.mlp[0].weight)
    assert len(c.train_history) == 1 and set(c.train_history[0]) >= {"loss_plain", "loss_pruned", "reward"}
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(net(x), net(x))
    again = TokenPruning(model, loader, target_macs=0.7, epochs=1, lr=1e-3, agent_lr=1e-2).compress()
    assert torch.equal(again(x), net(x))  # same arguments, same network


def test_policy_gradient_learns_which_tokens_matter():
    """The agent's sampled action and its log-probability form a working policy gradient: when dropping the
    marked tokens costs reward, the agent learns to keep them (the seed's pass-2 reward, in isolation)."""
    torch.manual_seed(0)
    agent = TokenAgent(8, hidden=8)
    agent.train()
    opt = torch.optim.Adam(agent.parameters(), lr=0.05)

    def batch():
        x = torch.randn(32, 17, 8)
        marked = torch.rand(32, 16) < 0.25
        x[:, 1:, 0] = marked.float() * 3.0  # feature 0 marks the tokens the "task" needs
        return x, marked

    for _ in range(150):
        x, marked = batch()
        agent.sample = 8
        out = agent(x)
        agent.sample = None
        kept_marked = (out[:, 1:, 0] > 1.5).sum(1).float()
        reward = kept_marked - marked.sum(1).float()  # minus the marked tokens dropped
        adv = (reward - reward.mean()) / (reward.std() + 1e-6)
        loss = -(adv * agent._last_log_prob).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    agent.eval()
    x, marked = batch()
    agent.mode, agent.keep = "batched", 8
    with torch.no_grad():
        out = agent(x)
    kept = (out[:, 1:, 0] > 1.5).sum(1)
    assert (kept == marked.sum(1).clamp(max=8)).float().mean() > 0.95


@pytest.mark.parametrize("fmt", ["json", "pkl"])
def test_save_load_equal(tmp_path, fmt):
    model = _tiny_vit()
    net = TokenPruning(model, _loader((1, 8, 8)), target_macs=0.6, epochs=0).compress()
    agents_of(net)[0].threshold = 0.42
    path = str(tmp_path / f"net.{fmt}")
    if fmt == "json":
        net.save_to_json(path)
        back = amc.ReconstructedNetwork.load_from_json(path)
    else:
        net.save(path)
        back = amc.ReconstructedNetwork.load(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(back(x), net(x))
    assert [a.keep for a in agents_of(back)] == [a.keep for a in agents_of(net)]
    assert agents_of(back)[0].threshold == 0.42


def test_onnx_export_of_batched_mode(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net = TokenPruning(_tiny_vit(), _loader((1, 8, 8)), target_macs=0.6, epochs=0).compress()
    x = torch.randn(4, 1, 8, 8)
    path = net.save_to_onnx(str(tmp_path / "net.onnx"), x[:1])
    sess = ort.InferenceSession(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), net(x).detach(), atol=1e-5)


@pytest.mark.parametrize("fuse", ["none", "merge"])
def test_onnx_export_of_dynamic_mode_keeps_a_data_dependent_token_count(tmp_path, fuse):
    """Dynamic mode exported: the token count stays data in the graph (a traced k, the example's
    count, made the export check refuse the file), so onnxruntime equals the network per image and
    per batch, including images where every token or no token passes."""
    ort = pytest.importorskip("onnxruntime")
    net = TokenPruning(_tiny_vit(), _loader((1, 8, 8)), target_macs=0.6, epochs=0, fuse=fuse).compress()
    set_mode(net, "dynamic")
    agents = agents_of(net)
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = net.save_to_onnx(str(tmp_path / "dyn.onnx"), x[:1])
    sess = ort.InferenceSession(path)
    name = sess.get_inputs()[0].name
    counts = set()
    for threshold in (None, 0.0, 1.0):  # calibrated, everything passes, nothing passes (the best is kept)
        if threshold is not None:
            for a in agents:
                a.threshold = threshold
            path = net.save_to_onnx(str(tmp_path / f"dyn{threshold}.onnx"), x[:1])
            sess = ort.InferenceSession(path)
        with torch.no_grad():
            for i in range(x.shape[0]):
                want, seen = _token_counts(net, x[i:i + 1])
                counts.add(tuple(seen))
                got = sess.run(None, {name: x[i:i + 1].numpy()})[0]
                assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)
            got = sess.run(None, {name: x[:3].numpy()})[0]
            assert torch.allclose(torch.from_numpy(got), net(x[:3]), atol=1e-5)
    assert len(counts) > 2  # the exported lengths did vary with the image


def test_onnx_export_of_dynamic_mode_with_one_fused_token_is_refused(tmp_path):
    net = TokenPruning(_tiny_vit(), _loader((1, 8, 8)), target_macs=0.6, epochs=0, fuse=True).compress()
    set_mode(net, "dynamic")
    with pytest.raises(ExportError, match="fuse='one' cannot be exported"):
        net.save_to_onnx(str(tmp_path / "dyn.onnx"), torch.randn(1, 1, 8, 8))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_dynamic_macs_and_training_free_scores():
    model = _tiny_vit()
    loader = _loader((1, 8, 8))
    for score in ("cls_attention", "norm", "random", "tome"):
        net = TokenPruning(model, loader, target_macs=0.6, epochs=0, score=score).compress()
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    net = TokenPruning(model, loader, target_macs=0.6, epochs=0).compress()
    full = amc.count(model, torch.randn(1, 1, 8, 8))[0]
    d = dynamic_macs(net, loader, limit=8)
    assert 0.2 * full < d < full


def test_cls_attention_needs_softmax_probs():
    with pytest.raises(PruningError, match="fused attention"):
        TokenPruning(_tv_vit(), _loader((3, 16, 16)), target_macs=0.6, epochs=0, score="cls_attention").compress()


def test_bad_input_is_refused(tmp_path):
    loader = _loader((1, 8, 8))
    with pytest.raises(PruningError, match="no transformer encoder"):
        TokenPruning(create("digits_resnet"), loader, target_macs=0.6, epochs=0)
    with pytest.raises(PruningError, match="not encoder block outputs"):
        TokenPruning(_tiny_vit(), loader, target_macs=0.6, layers=["blocks.0.fc1"], epochs=0)
    for bad in (0.0, 1.5, -0.1, "0.5"):
        with pytest.raises(PruningError, match="target_macs"):
            TokenPruning(_tiny_vit(), loader, target_macs=bad, epochs=0)
    with pytest.raises(PruningError, match="out of reach"):
        TokenPruning(_tiny_vit(), loader, target_macs=0.05, epochs=0).compress()
    nan = DataLoader(TensorDataset(torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long)),
                     batch_size=4)
    folder = tmp_path / "ckpt"
    with pytest.raises(TrainingError, match="became nan"):
        TokenPruning(_tiny_vit(), nan, target_macs=0.6, epochs=1, checkpointfolder=str(folder)).compress()
    assert not folder.exists() or not os.listdir(folder)


def test_user_model_untouched():
    model = _tiny_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    TokenPruning(model, _loader((1, 8, 8), n=8), target_macs=0.7, epochs=1).compress()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_apt_trainer_plugs_into_base_trainer():
    """Users with their own BaseTrainer loop: agent_network() + APTTrainer train the agents and the model."""
    from amc.compressors.tokens import APTTrainer

    loader = _loader((1, 8, 8), n=16)
    c = TokenPruning(_tiny_vit(), loader, target_macs=0.7, epochs=0)
    net, step = c.agent_network()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    trainer = APTTrainer(loader, loader, network=net, optimizer=torch.optim.AdamW(net.parameters(), 1e-3),
                         criterion=nn.CrossEntropyLoss(), apt_step=step, epochs=1, progress=False, device="cpu")
    trainer.run()
    moved = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("network.token_agent") for k in moved)
    assert any("blocks" in k for k in moved)
    assert [a.keep for a in agents_of(net)] == c.keep


def test_batched_mode_is_per_image():
    """Top-k is per image: an image's output does not depend on the rest of its batch."""
    net = TokenPruning(_tiny_vit(), _loader((1, 8, 8)), target_macs=0.6, epochs=0).compress()
    x = torch.randn(6, 1, 8, 8)
    whole = net(x)
    alone = torch.cat([net(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(whole, alone, atol=1e-5)


def test_token_merge_keeps_duplicates_exact():
    """ToMe-style merging of identical token pairs changes nothing a mean-pooled reader would see."""
    from amc.compressors.tokens import TokenMerge

    torch.manual_seed(0)
    base = torch.randn(2, 4, 8)
    x = torch.cat([torch.zeros(2, 1, 8), base.repeat_interleave(2, dim=1)], dim=1)  # 8 tokens: 4 pairs
    out = TokenMerge(keep=4)(x)
    assert out.shape == (2, 5, 8)
    got = sorted(map(tuple, out[0, 1:].tolist()))
    assert got == pytest.approx(sorted(map(tuple, base[0].tolist())))
    assert TokenMerge(keep=3)(x).shape == (2, 4, 8)


@pytest.mark.parametrize("score", ["agent", "tome"])
def test_channel_pruning_composes_with_token_pruning(tmp_path, score):
    """Dims and tokens on the same ViT: amc.prune shrinks a token-pruned network's residual width, heads and
    MLP, the agents' scorers follow the pruned features, soft == hard, and the result round-trips."""
    net = TokenPruning(_tiny_vit(), _loader((1, 8, 8)), target_macs=0.75, epochs=0, score=score).compress()
    x = torch.randn(4, 1, 8, 8)
    hard = amc.prune(net, ratio=0.5, example_inputs=(x[:1],))
    soft = amc.prune(net, ratio=0.5, example_inputs=(x[:1],), mode="soft")
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)
    assert amc.count(hard, x[:1])[0] < 0.4 * amc.count(net, x[:1])[0]
    if score == "agent":
        assert agents_of(hard)[0].dim == 12 and agents_of(hard)[0].mlp[0].in_features == 24
    back = amc.ReconstructedNetwork.load_from_json(hard.save_to_json(str(tmp_path / "both.json")))
    assert torch.equal(back(x), hard(x))


def test_fused_token_is_the_weighted_mean_of_the_dropped():
    """fuse=True (EViT's fusion): CLS, the kept tokens in order, then one token = the dropped tokens averaged
    with softmax weights of their keep-logits; nothing is fused when nothing is dropped."""
    torch.manual_seed(0)
    agent = TokenAgent(8, keep=3, fuse=True).eval()
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        out = agent(x)
        s = agent.scores(x)
    assert out.shape == (2, 1 + 3 + 1, 8)
    for b in range(2):
        top = s[b].topk(3).indices.sort().values
        dropped = [i for i in range(6) if i not in top.tolist()]
        w = torch.softmax(s[b, dropped], 0)
        assert torch.allclose(out[b, 1:4], x[b, 1 + top])
        assert torch.allclose(out[b, 4], (w[:, None] * x[b, 1 + torch.tensor(dropped)]).sum(0), atol=1e-6)
    agent.keep = 6
    assert torch.equal(agent(x), x)


@pytest.mark.parametrize("score", ["agent", "cls_attention"])
def test_fuse_meets_the_budget_and_counts_the_extra_token(score):
    model = _tiny_vit()
    loader = _loader((1, 8, 8))
    c = TokenPruning(model, loader, target_macs=0.7, epochs=0, score=score, fuse=True)
    net = c.compress()
    x1 = torch.randn(1, 1, 8, 8)
    full = amc.count(model, x1)[0]
    macs = amc.count(net, x1)[0]
    assert 0.6 * full < macs <= 0.7 * full
    out, counts = _token_counts(net, torch.randn(3, 1, 8, 8))
    assert counts == [k + 2 for k in c.keep]  # CLS + kept + the fused token
    assert out.shape == (3, 10)
    plain = TokenPruning(model, loader, target_macs=0.7, epochs=0, score=score).compress()
    for a, b in zip(agents_of(net), agents_of(plain)):
        a.keep = b.keep  # same kept tokens: fusion costs its extra token downstream, and its weighted sum
    assert amc.count(net, x1)[0] > amc.count(plain, x1)[0]


@pytest.mark.parametrize("fuse", [True, "merge"])
def test_fuse_and_distill_train_save_and_export(tmp_path, fuse):
    model = _tiny_vit()
    loader = _loader((1, 8, 8), n=16)
    c = TokenPruning(model, loader, target_macs=0.7, epochs=1, fuse=fuse, distill=1.0, lr=1e-3)
    net = c.compress()
    assert c.train_history[0]["distill"] >= 0
    x = torch.randn(4, 1, 8, 8)
    path = net.save_to_json(str(tmp_path / "fused.json"))
    back = amc.ReconstructedNetwork.load_from_json(path)
    assert all(a.fuse == ("one" if fuse is True else fuse) for a in agents_of(back))
    assert torch.equal(back(x), net(x))
    set_mode(net, "dynamic")
    assert net(x[:1]).shape == (1, 10)
    set_mode(net, "batched")
    ort = pytest.importorskip("onnxruntime")
    onnx_path = net.save_to_onnx(str(tmp_path / "fused.onnx"), x[:1])
    sess = ort.InferenceSession(onnx_path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), net(x).detach(), atol=1e-5)


def test_fuse_and_distill_bad_input():
    loader = _loader((1, 8, 8))
    with pytest.raises(PruningError, match="fuse must be one of"):
        TokenPruning(_tiny_vit(), loader, target_macs=0.6, epochs=0, fuse="yes")
    with pytest.raises(PruningError, match="merges them already"):
        TokenPruning(_tiny_vit(), loader, target_macs=0.6, epochs=0, score="tome", fuse=True)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(PruningError, match="distill .*must be"):
            TokenPruning(_tiny_vit(), loader, target_macs=0.6, epochs=0, distill=bad)


@pytest.mark.parametrize("fuse", [False, True, "merge"])
@pytest.mark.parametrize("mode", ["dynamic", "batched"])
def test_batch1_fast_path_matches_the_general_path(fuse, mode, monkeypatch):
    """Batch 1 takes a leaner path (fewer ops); it keeps the same tokens and computes the same output as the
    general path (run here on a batch of two copies of the image)."""
    import amc.compressors.tokens.agent as agent_module

    general = []
    keep_top = agent_module.keep_top
    monkeypatch.setattr(agent_module, "keep_top", lambda *a, **k: general.append(1) or keep_top(*a, **k))
    torch.manual_seed(0)
    agent = TokenAgent(16, mode=mode, keep=5, threshold=0.5, fuse=fuse).eval()
    kept = set()
    with torch.no_grad():
        agent.mlp[2].bias.fill_(0.2)
        for seed in range(20):
            x = torch.randn(1, 13, 16, generator=torch.Generator().manual_seed(seed))
            one = agent(x)
            assert not general  # batch 1 did not take the general path
            two = agent(torch.cat([x, x]))  # the general path (batch > 1)
            assert len(general) == 1
            general.clear()
            assert one.shape == two[:1].shape and torch.allclose(one, two[:1], atol=1e-5)
            kept.add(one.shape[1])
        assert mode == "batched" or len(kept) > 1  # dynamic lengths vary per image
        agent.threshold, agent.keep = 0.999999, 1  # dynamic: nothing passes, the best token is kept
        x = torch.randn(1, 13, 16)
        assert torch.allclose(agent(x), agent(torch.cat([x, x]))[:1], atol=1e-5)
        assert agent(x).shape[1] == 2 + int(fuse is True)


def test_merge_averages_each_dropped_token_into_its_most_similar_kept_token():
    torch.manual_seed(0)
    agent = TokenAgent(8, keep=3, fuse="merge").eval()
    x = torch.randn(3, 9, 8)
    with torch.no_grad():
        out = agent(x)
        s = agent.scores(x)
    assert out.shape == (3, 4, 8) and torch.equal(out[:, 0], x[:, 0])
    for b in range(3):
        keep = s[b].topk(3).indices.sort().values.tolist()
        groups = {k: [x[b, 1 + k]] for k in keep}
        for i in range(8):
            if i not in keep:
                sims = [torch.cosine_similarity(x[b, 1 + i], x[b, 1 + k], dim=0) for k in keep]
                groups[keep[int(torch.stack(sims).argmax())]].append(x[b, 1 + i])
        want = torch.stack([torch.stack(groups[k]).mean(0) for k in keep])
        assert torch.allclose(out[b, 1:], want, atol=1e-6)
    model = _tiny_vit()
    c = TokenPruning(model, _loader((1, 8, 8)), target_macs=0.7, epochs=0, fuse="merge")
    net = c.compress()
    x1 = torch.randn(1, 1, 8, 8)
    full = amc.count(model, x1)[0]
    assert 0.6 * full < amc.count(net, x1)[0] <= 0.7 * full  # the similarity products are counted too
    _, counts = _token_counts(net, torch.randn(3, 1, 8, 8))
    assert counts == [k + 1 for k in c.keep]


def test_pass2_samples_and_chain():
    """samples=r draws r actions per image in pass 2 (leave-one-out baseline); chain=True lets the agents
    before the acting one prune as at inference, so it acts on the tokens it will see."""
    model = _tiny_vit()
    loader = _loader((1, 8, 8), n=16)
    c = TokenPruning(model, loader, target_macs=0.7, epochs=0, samples=3, chain=True)
    net, step = c.agent_network()
    agents = agents_of(net)
    seen = []
    hook = agents[1].register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[0], a[0].shape[1])))
    net.train()
    x, y = next(iter(loader))
    step.step = 1  # agent 1 acts in pass 2
    losses = step(x, y)
    hook.remove()
    losses["total_loss"].backward()
    assert agents[1].mlp[0].weight.grad is not None and agents[1].mlp[0].weight.grad.abs().sum() > 0
    # pass 1 (all tokens), pass 2 (3 copies of the batch, after agent 0 pruned), pass 3 (after agent 0)
    assert seen == [(8, 17), (24, c.keep[0] + 1), (8, c.keep[0] + 1)]
    with pytest.raises(PruningError, match="samples must be an int >= 1"):
        TokenPruning(model, loader, target_macs=0.7, epochs=0, samples=0)
    with pytest.raises(PruningError, match="chain must be True or False"):
        TokenPruning(model, loader, target_macs=0.7, epochs=0, chain="yes")


def _written_scores(agent: TokenAgent, x: torch.Tensor) -> torch.Tensor:
    """The seed's written form of the scorer: mlp([h, h * h_cls]) over the non-CLS tokens."""
    h = agent.norm(x)
    return agent.mlp(torch.cat([h[:, 1:], h[:, 1:] * h[:, :1]], dim=-1)).squeeze(-1)


def test_scorer_and_row_selection_compute_the_plain_forms():
    """The scorer folds h_cls into one first-layer weight per image and selection flattens the rows; both
    must give what the seed's written form gives: mlp([h, h * h_cls]) and a gather of the kept rows."""
    from amc.compressors.tokens.agent import keep_top, take_rows

    torch.manual_seed(0)
    agent = TokenAgent(16, keep=5).eval()
    x = torch.randn(3, 9, 16)
    with torch.no_grad():
        plain = _written_scores(agent, x)
        assert torch.allclose(agent.scores(x), plain, atol=1e-6)
        idx = torch.randint(0, 9, (3, 4))
        assert torch.equal(take_rows(x, idx), x.gather(1, idx.unsqueeze(-1).expand(-1, -1, 16)))
        top = plain.topk(5, dim=1).indices.sort(dim=1).values
        ref = torch.cat([x[:, :1], x[:, 1:].gather(1, top.unsqueeze(-1).expand(-1, -1, 16))], dim=1)
        assert torch.equal(keep_top(x, agent.scores(x), 5), ref)
        assert torch.equal(take_rows(x[:, 1:], idx), x[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, 16)))


@pytest.mark.parametrize("fuse", ["none", "one", "merge"])
def test_agent_macs_per_image_do_not_depend_on_the_batch(fuse):
    """Every fuse mode counts the folded scorer at every batch size, so its count per image is the same at
    batch 1 and 2 (merging once was counted with another formula at batch 1)."""
    from amc.compressors.tokens.agent import agent_macs

    torch.manual_seed(0)
    agent = TokenAgent(16, keep=4, fuse=fuse).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        one = agent_macs(agent, (x[:1],), {}, agent(x[:1]))
        two = agent_macs(agent, (x,), {}, agent(x))
    assert one > 0 and two == 2 * one


def test_add_rows_is_scatter_add_of_rows():
    from amc.compressors.tokens.agent import add_rows

    torch.manual_seed(0)
    dst, src = torch.randn(3, 5, 4), torch.randn(3, 7, 4)
    idx = torch.randint(0, 5, (3, 7))
    ref = dst.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, 4), src)
    assert torch.allclose(add_rows(dst, idx, src), ref, atol=1e-6)
    assert torch.allclose(add_rows(dst[:, 1:], idx.clamp(max=3), src), dst[:, 1:].scatter_add(
        1, idx.clamp(max=3).unsqueeze(-1).expand(-1, -1, 4), src), atol=1e-6)  # a sliced destination too


def test_a_replaced_first_layer_runs_as_written():
    """A scorer whose first Linear was replaced (a quantised or wrapped layer) must run through that module,
    not through the folded weight it would bypass."""
    class Doubled(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, z):
            return 2 * self.lin(z)

    torch.manual_seed(0)
    agent = TokenAgent(16, keep=5).eval()
    x = torch.randn(2, 9, 16)
    agent.mlp[0] = Doubled(agent.mlp[0])
    with torch.no_grad():
        want = _written_scores(agent, x)
        assert torch.allclose(agent.scores(x), want, atol=1e-6)
        top = want[:1].topk(5, dim=1).indices.sort(dim=1).values
        assert torch.equal(agent(x[:1])[0, 1:], x[0, 1:][top[0]])  # the batch-1 path too


@pytest.mark.parametrize("b,n,k", [(1, 13, 3), (7, 50, 33), (4, 50, 1), (3, 5, 3)])
def test_eager_merge_matches_the_export_path_in_values_and_gradients(b, n, k, monkeypatch):
    """Eager merging (one mask, in-place adds) is the exported path's function, gradients included."""
    import amc.compressors.tokens.agent as agent_module

    torch.manual_seed(n + k)
    x = torch.randn(b, n, 16, requires_grad=True)
    scores, g = torch.randn(b, n - 1), torch.randn(b, k + 1, 16)
    eager = keep_top(x, scores, k, merge=True)
    monkeypatch.setattr(agent_module, "_exporting", lambda: True)
    written = keep_top(x, scores, k, merge=True)
    assert eager.shape == written.shape == (b, k + 1, 16)
    assert torch.allclose(eager, written, atol=1e-6)
    grads = [torch.autograd.grad((out * g).sum(), x)[0] for out in (eager, written)]
    assert torch.allclose(*grads, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 20.0, 30.0])
def test_dynamic_threshold_holds_where_float32_sigmoids_saturate(offset):
    """Agents whose logits sit far above 16 (float32 sigmoid = 1 for all of them) still keep their calibrated
    share in dynamic mode, and batch 1 keeps the same tokens as a batch: thresholds live in logit space."""
    from amc.compressors.tokens.agent import threshold_logit
    from amc.compressors.tokens.training import calibrate_thresholds

    torch.manual_seed(0)
    agent = TokenAgent(16, keep=6, mode="dynamic", fuse="merge").eval()
    with torch.no_grad():
        agent.mlp[2].weight.mul_(40.0)  # logits spread over tens, shifted by `offset`
        agent.mlp[2].bias.fill_(offset)
        x = torch.randn(32, 13, 16)
        assert (torch.sigmoid(agent.scores(x)) == 1.0).float().mean() > 0.2 or offset == 0.0
        calibrate_thresholds(agent, [agent], [6], 13, [x])
        agent.mode = "dynamic"
        cut = threshold_logit(agent.threshold)
        s = agent.scores(x)
        assert abs(float((s > cut).float().sum(1).mean()) - 6) <= 0.5  # the calibrated share, on these images
        for i in range(8):
            one = agent(x[i:i + 1])
            assert one.shape[1] == 1 + max(1, int((s[i] > cut).sum()))
            assert torch.allclose(one, agent(x[i:i + 1].expand(2, -1, -1))[:1], atol=1e-5)
