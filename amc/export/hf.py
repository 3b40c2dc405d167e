"""Pruned Hugging Face models as `transformers` checkpoints: `save_pretrained` / `from_pretrained`.

A config has one `intermediate_size` and one head count for every layer, so a pruned model reloads with
plain `transformers` only when its sizes are uniform and its attention keeps what the config would
derive (the head size and softmax scale). `describe_in_config` tries that config and keeps it when a
model built from it matches the pruned one (shapes and head attributes); otherwise the config keeps its
original sizes plus an `amc_layers` entry (every tensor shape and attribute that differs), which
`from_pretrained` here applies before loading the weights. No code is run from the checkpoint: the model
class is looked up by name in `transformers` only.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from ..errors import ExportError, LoadError
from .atomic import atomic_paths
from .attention_rules import ALL_HEADS_ATTRS, HEAD_COUNT_ATTRS, HEAD_SIZE_ATTRS
from .layer_sizes import follow_tensors

_ATTRS = HEAD_COUNT_ATTRS + HEAD_SIZE_ATTRS + ALL_HEADS_ATTRS + (  # nf, nx, split_size: GPT-2's Conv1D, attention
    "scaling", "split_size", "num_key_value_heads", "nf", "nx", "hidden_dim", "intermediate_dim",  # MoE
    "ssm_state_size", "time_step_rank",  # Mamba's mixer
    "rotary_ndims")  # Phi's partial rotary width (`q[..., :self.rotary_ndims]`)
_SAME_AS = {"state_size": "ssm_state_size"}  # config field -> the layer attribute that holds it (Mamba)
_KEY = "amc_layers"
_FFN_ATTRS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "ffn_hidden_size",  # the MLP's hidden width
              "moe_intermediate_size", "shared_expert_intermediate_size")  # a mixture of experts': each expert's


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _attributes(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    out = {}
    for path, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in _ATTRS if isinstance(getattr(m, a, None), (int, float))}
        attrs.update({a: v for a, v in vars(m).items()  # a scale the layer derived from the config at init
                      if type(v) is float and not a.startswith("_") and v == v})
        if isinstance(m, nn.LayerNorm) and m.weight is None and m.bias is None:  # no tensor carries its width
            attrs["normalized_shape"] = list(m.normalized_shape)
        out[path] = attrs
    return out


def _shapes(model: nn.Module) -> Dict[str, list]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _derived(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The buffers a checkpoint leaves out, which the class computes from the config when it is built
    (Gemma's `embed_scale = hidden_size ** 0.5`, rotary `inv_freq`): a reload recomputes them."""
    return {f"{path}.{name}" if path else name: b for path, m in model.named_modules()
            for name, b in m._buffers.items() if b is not None and name in m._non_persistent_buffers_set}


def _same_derived(model: nn.Module, rebuilt: nn.Module) -> bool:
    mine, theirs = _derived(model), _derived(rebuilt)
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].to(mine[k].dtype)) for k in mine)


def _built_from(model: nn.Module, config: Any, values: bool = False) -> nn.Module:
    """A model of `model`'s class built from `config`: on the meta device, or with real values (weights
    left uninitialised) where the computed buffers are to be compared."""
    if not values:
        with torch.device("meta"):
            return type(model)(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialising is slower, the result the same
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return type(model)(config)


def _uniform(values: list) -> Optional[int]:
    return values[0] if values and all(v == values[0] for v in values) else None


def _candidate(model: nn.Module, original: nn.Module) -> Any:
    """The original config with every size the pruned model keeps uniform across its layers."""
    config = copy.deepcopy(original.config)
    before = dict(original.named_modules())
    for name in _FFN_ATTRS:
        inter = getattr(config, name, None)
        if isinstance(inter, int) and not isinstance(inter, bool):
            sizes = [m.out_features for p, m in model.named_modules() if isinstance(m, nn.Linear)
                     and isinstance(before.get(p), nn.Linear) and before[p].out_features == inter]
            sizes += [m.intermediate_dim for p, m in model.named_modules()  # experts stored as 3-D weights
                      if isinstance(getattr(m, "intermediate_dim", None), int)
                      and getattr(before.get(p), "intermediate_dim", None) == inter]
            if _uniform(sizes) is not None:
                setattr(config, name, _uniform(sizes))
    width = _embedding_width(model)
    for key, value in list(vars(config).items()):  # a size the layers keep under the config's name (Mamba)
        if isinstance(value, int) and not isinstance(value, bool):
            attr = _SAME_AS.get(key, key)
            sizes = [getattr(m, attr) for p, m in model.named_modules() if isinstance(getattr(m, attr, None), int)
                     and getattr(before.get(p), attr, None) == value]
            if _uniform(sizes) is not None and _uniform(sizes) != value:
                setattr(config, key, _uniform(sizes))
    if width is not None and width != _embedding_width(original) and hasattr(config, "hidden_size"):
        if getattr(config, "word_embed_proj_dim", None) == config.hidden_size:  # OPT: no projection in/out
            config.word_embed_proj_dim = width
        config.hidden_size = width  # the residual width (GPT-2's n_embd, T5's d_model through attribute maps)
    heads = [getattr(m, a) for m in model.modules() for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)]
    dims = [getattr(m, a) for m in model.modules() for a in HEAD_SIZE_ATTRS if isinstance(getattr(m, a, None), int)]
    q_heads, kv_heads = _projection_heads(model)
    heads = heads or q_heads  # Llama-style attentions keep no head count, only the head size
    if _uniform(kv_heads) is not None and isinstance(getattr(config, "num_key_value_heads", None), int):
        config.num_key_value_heads = _uniform(kv_heads)
    if _uniform(heads) is not None and hasattr(config, "num_attention_heads"):
        config.num_attention_heads = _uniform(heads)
        if _uniform(dims) is not None and _uniform(dims) * _uniform(heads) != getattr(config, "hidden_size", None):
            try:
                config.head_dim = _uniform(dims)
            except AttributeError:  # Falcon derives head_dim (a read-only property): the check below decides
                pass
    return config


def _embedding_width(model: nn.Module) -> Optional[int]:
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):  # two-tower models (CLIPModel) have no one input embedding
        emb = None
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    proj = getattr(emb, "projection", None)  # a vision model's patch embedding (ViT, DeiT, BEiT): its conv
    if isinstance(proj, (nn.Conv2d, nn.Linear)):
        return proj.out_channels if isinstance(proj, nn.Conv2d) else proj.out_features
    return None


def _projection_heads(model: nn.Module) -> Tuple[List[int], List[int]]:
    """Query and key/value head counts of every attention with q_proj / k_proj Linears (or one fused
    query_key_value) and a head size."""
    q_heads, kv_heads = [], []
    for m in model.modules():
        size = next((getattr(m, a) for a in HEAD_SIZE_ATTRS if isinstance(getattr(m, a, None), int)), None)
        q, k = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
        fused = getattr(m, "query_key_value", None)  # GPT-NeoX: q, k and v in one projection
        qkv, kv = getattr(m, "qkv_proj", None), getattr(m, "num_key_value_heads", None)  # Phi-3: q, then k and v
        if size and isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            q_heads.append(q.out_features // size)
            kv_heads.append(k.out_features // size)
        elif size and isinstance(fused, nn.Linear) and fused.out_features % (3 * size) == 0:
            q_heads.append(fused.out_features // (3 * size))
        elif size and isinstance(qkv, nn.Linear) and isinstance(kv, int) and qkv.out_features % size == 0:
            q_heads.append(qkv.out_features // size - 2 * kv)
            kv_heads.append(kv)
    return q_heads, kv_heads


def _update_in_place(target: Any, source: Any) -> None:
    """Give `target` (a config) the values of `source`, sub-configs field by field: every layer holds the
    model's config object itself (Phi-3's attention reads its head count there at each call, and
    `set_attn_implementation` changes it), so a new object would leave the layers reading the old one."""
    for key, value in vars(source).items():
        current = vars(target).get(key)
        if type(current) is type(value) and hasattr(value, "to_dict") and current is not value:
            _update_in_place(current, value)
        elif key not in vars(target) or current != value:
            setattr(target, key, value)


def describe_in_config(model: nn.Module, original: nn.Module) -> None:
    """Make `model.config` describe the pruned `model` (see the module docstring), in place."""
    config = _candidate(model, original)
    shapes, attrs = _shapes(model), _attributes(model)
    try:
        rebuilt = _built_from(model, config, values=True)
        if _shapes(rebuilt) == shapes and _attributes(rebuilt) == attrs and _same_derived(model, rebuilt):
            _update_in_place(model.config, config)
            return
    except Exception:  # noqa: BLE001 - a config transformers refuses is one it cannot describe
        pass
    config = copy.deepcopy(original.config)
    base = _built_from(model, config, values=True)
    base_shapes, base_attrs, base_derived = _shapes(base), _attributes(base), _derived(base)
    derived = {k: b for k, b in _derived(model).items()
               if k not in base_derived or b.shape != base_derived[k].shape
               or not torch.equal(b.cpu(), base_derived[k].to(b.dtype))}
    setattr(config, _KEY, {
        "shapes": {k: v for k, v in shapes.items() if base_shapes.get(k) != v},
        "attributes": {p: {a: v for a, v in d.items() if base_attrs.get(p, {}).get(a) != v}
                       for p, d in attrs.items() if d != base_attrs.get(p, {})},
        "buffers": {k: {"dtype": str(b.dtype).replace("torch.", ""), "value": b.cpu().tolist()}
                    for k, b in derived.items()},
    })
    _update_in_place(model.config, config)


@contextlib.contextmanager
def _saving_every_tensor(model: nn.Module) -> Iterator[None]:
    """transformers leaves out of a checkpoint the tensors its class can rebuild (Marian's sinusoidal position
    tables: `_keys_to_ignore_on_save`); a pruned model's are columns of the original's, which a rebuild at
    the new width would not give back, so every tensor is written."""
    own = "_keys_to_ignore_on_save" in vars(model)
    before = vars(model).get("_keys_to_ignore_on_save")
    model._keys_to_ignore_on_save = None
    try:
        yield
    finally:
        if own:
            model._keys_to_ignore_on_save = before
        else:
            del model._keys_to_ignore_on_save


def save_pretrained(model: nn.Module, directory: str, **kwargs: Any) -> str:
    """`model.save_pretrained(directory)`, written to a temporary folder first and then moved in file by
    file (`atomic_paths`): an interrupted save leaves the previous checkpoint loadable."""
    if not is_transformers_model(model):
        raise ExportError(f"save_pretrained takes a transformers PreTrainedModel, got {type(model).__name__}: "
                          "use amc.export.to_module(net, model) on the model you traced first")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".amc-save-", dir=directory)
    try:
        if getattr(model.config, _KEY, None):  # keys as the model names them: our loader reads them as they are
            kwargs.setdefault("save_original_format", False)
        with _saving_every_tensor(model):
            model.save_pretrained(scratch, **kwargs)
        names = sorted(os.listdir(scratch), key=lambda n: n == "config.json")  # the config goes in last
        with atomic_paths(*(os.path.join(directory, n) for n in names)) as temps:
            for name, tmp in zip(names, temps):
                os.replace(os.path.join(scratch, name), tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def _resize(model: nn.Module, shapes: Dict[str, list]) -> None:
    by_module: Dict[str, Dict[str, list]] = {}
    for name, shape in shapes.items():
        path, _, leaf = name.rpartition(".")
        by_module.setdefault(path, {})[leaf] = shape
    owners: Dict[str, nn.Module] = {}
    for path, leaves in by_module.items():
        module = model.get_submodule(path)
        for leaf, shape in leaves.items():
            old = getattr(module, leaf)
            new = torch.empty(shape, dtype=old.dtype)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = new
        if isinstance(module, ParametrizationList):  # a weight norm's g and v: its layer is resized below
            path = path.rpartition(".parametrizations.")[0]
        owners[path] = model.get_submodule(path)
    for path, module in owners.items():  # after every tensor is in place, so a computed weight has its shape
        # the model's own modules use their tensors as they are; a torch.nn layer's sizes are attributes
        if not follow_tensors(module) and type(module).__module__.startswith("torch.nn"):
            raise LoadError(f"the checkpoint resizes {path} ({type(module).__name__}), which amc cannot rebuild")


def from_pretrained(directory: str, model_class: Optional[type] = None) -> nn.Module:
    """Load a checkpoint written by `save_pretrained` (pruned or not), in eval mode."""
    import transformers
    from safetensors.torch import load_file

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise LoadError(f"{directory!r} holds no config.json: give the folder amc.export.save_pretrained wrote")
    config = transformers.AutoConfig.from_pretrained(directory)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            raise LoadError(f"{directory}/config.json names no transformers model class ({names}): pass "
                            "model_class=")
    layers = getattr(config, _KEY, None)
    if not layers:
        return model_class.from_pretrained(directory).eval()
    model = model_class(config)
    _resize(model, layers.get("shapes", {}))
    for path, attrs in layers.get("attributes", {}).items():
        module = model.get_submodule(path) if path else model
        for name, value in attrs.items():
            setattr(module, name, tuple(value) if isinstance(value, list) else value)
    for key, saved in layers.get("buffers", {}).items():  # computed at build time, left out of the weights
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path) if path else model
        dtype = getattr(torch, str(saved.get("dtype", "")), None)
        if name not in module._buffers or not isinstance(dtype, torch.dtype):
            raise LoadError(f"{directory}/config.json: amc_layers names a buffer {key!r} the model does not "
                            "hold; save and load with the same transformers version")
        module._buffers[name] = torch.tensor(saved["value"], dtype=dtype)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise LoadError(f"{directory} holds no .safetensors weights")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # the resize above gave the tied tensors one Parameter each
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise LoadError(f"{directory}: weights missing {missing[:5]} / unexpected {unexpected[:5]} for "
                        f"{model_class.__name__}; save pruned models with amc.export.save_pretrained, which "
                        "keeps the names the model uses")
    return model.eval()
