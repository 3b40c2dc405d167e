"""torchvision detectors, one per family: traced, equal to eager, saved and loaded, pruned with the heads kept.

Random weights give no detection above the default score threshold, so every model is built with the
threshold at 0.0: each image then yields `detections_per_img` boxes (and masks), and the comparisons
below check real boxes, labels, scores and masks. Inputs are small (the transforms resize to 128, SSDlite to
its fixed 320) so the whole family list runs in the default suite.
"""
from __future__ import annotations

import re
from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
import torchvision

import amc
from amc.errors import GraphError
from amc.graph.counting import count_params

SMALL = {"min_size": 128, "max_size": 128}
RCNN = {"box_score_thresh": 0.0, "box_detections_per_img": 20, "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 50}
ONE_STAGE = {"score_thresh": 0.0, "detections_per_img": 20}
FAMILIES: Dict[str, Dict[str, Any]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {**RCNN, **SMALL},
    "retinanet_resnet50_fpn": {**ONE_STAGE, **SMALL},
    "ssdlite320_mobilenet_v3_large": dict(ONE_STAGE),  # the transform always resizes to 320x320
    "fcos_resnet50_fpn": {**ONE_STAGE, **SMALL},
    "maskrcnn_resnet50_fpn": {**RCNN, **SMALL},
    "keypointrcnn_resnet50_fpn": {**RCNN, **SMALL},
}
# Layers whose width is the number of classes, box coordinates or masks (times anchors): never pruned.
HEAD_LAYER = re.compile(r"(^|\.)(cls_logits|bbox_pred|bbox_reg|bbox_ctrness|cls_score|mask_fcn_logits)$"
                        r"|kps_score_lowres|^head\.(classification|regression)_head\.module_list\.\d+(\.1)?$")


def head_widths(named_modules) -> Dict[str, int]:
    convs = (nn.Conv2d, nn.ConvTranspose2d)
    return {name: m.out_channels if isinstance(m, convs) else m.out_features
            for name, m in named_modules if HEAD_LAYER.search(name) and isinstance(m, (*convs, nn.Linear))}


def images(n: int, seed: int, size=(128, 128)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def traced(request, one_thread):
    """(name, eager model, one-image trace) built once per family."""
    name = request.param
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **FAMILIES[name]).eval()
    with pytest.warns(UserWarning):  # the generic-replay note on nms / roi_align: expected, not an error
        net = amc.trace(model, images(1, seed=1))
    return name, model, net


@pytest.mark.parametrize("seed", [2, 3])
def test_traced_equals_eager_on_another_image(traced, assert_same, seed):
    """Box counts, per-class NMS loops, mask pasting and keypoint decoding follow the image, not the trace."""
    name, model, net = traced
    img = images(1, seed=seed)
    with torch.no_grad():
        ref, got = model(img), net(img)
    assert len(ref) == 1 and ref[0]["boxes"].shape[0] > 0, "no detections: the comparison would be empty"
    expected = {"boxes", "labels", "scores"} | ({"masks"} if name.startswith("maskrcnn") else set()) | (
        {"keypoints", "keypoints_scores"} if name.startswith("keypoint") else set())
    assert set(ref[0]) == expected
    assert_same(ref, got)


def test_two_image_trace_equals_eager_on_two_other_images(traced, assert_same):
    name, model, _ = traced
    net2 = amc.trace(model, images(1, seed=6) + images(1, seed=9, size=(96, 128)))
    img = images(1, seed=7) + images(1, seed=8, size=(96, 128))
    with torch.no_grad():
        ref, got = model(img), net2(img)
    assert len(got) == 2
    assert_same(ref, got)


def test_json_and_pkl_round_trips(traced, tmp_path, assert_same):
    _, _, net = traced
    img = images(1, seed=3)
    with torch.no_grad():
        ref = net(img)
    net.save_to_json(str(tmp_path / "det.json"))
    net.save(pkl=str(tmp_path / "det.pkl"))
    load = (lambda: amc.ReconstructedNetwork.load(pkl=str(tmp_path / "det.pkl")),
            lambda: amc.ReconstructedNetwork.load_from_json(str(tmp_path / "det.json")))
    for net2 in (loader() for loader in load):
        assert net2.guards == net.guards
        with torch.no_grad():
            assert_same(ref, net2(img))


def test_two_images_refused_by_one_image_trace(traced):
    _, _, net = traced
    assert any(g["source"] == "input structure" for g in net.guards)
    with pytest.raises(GraphError, match="input structure guard failed") as info, torch.no_grad():
        net(images(2, seed=4))
    assert "has 2 item(s); it was captured with 1" in str(info.value)


def test_pruned_keeps_heads_and_output_structure(traced):
    name, model, net = traced
    example = images(1, seed=1)
    pruned = amc.prune(net, ratio=0.3, example_inputs=(example,))
    heads = head_widths(model.named_modules())
    assert heads, f"{name}: no head layer found by the pattern"
    kept = head_widths((node.name, mod) for node, mod in pruned.iter_nodes())
    assert kept == heads, f"{name}: class/box output channels changed"
    assert count_params(pruned) < 0.9 * count_params(net)
    img = images(1, seed=5)
    with torch.no_grad():
        ref = model(img)
        out = pruned(img)
    before, after = amc.count(net, example)[0], amc.count(pruned, example)[0]
    assert [{k: v.shape[1:] for k, v in o.items()} for o in out] == \
           [{k: v.shape[1:] for k, v in o.items()} for o in ref]
    assert all(o["boxes"].shape[0] > 0 for o in out)
    assert after < 0.9 * before, f"{name}: MACs {after} vs {before}"


def test_leaf_functions_load_in_a_fresh_process(tmp_path, outputs_in_fresh_process):
    """A saved detector names torchvision's leaf functions (batched_nms, paste_masks_in_image); a new
    process that never imported torchvision's detection package still loads and runs it, JSON and pkl."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("maskrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                         **FAMILIES["maskrcnn_resnet50_fpn"]).eval()
    img = images(1, seed=1)
    net = amc.trace(model, img)
    with torch.no_grad():
        ref = net(img)
    for out in outputs_in_fresh_process(tmp_path, net, img, absent=["torchvision.models.detection"]):
        assert all(torch.equal(out[0][k], ref[0][k]) for k in ref[0])
