"""The Fashion-MNIST originals the compression benchmarks start from, trained once and cached.

    python scripts/fashion_originals.py                 # train (or load) vgg_small and resnet20, print accuracy
    python scripts/fashion_originals.py --models vit_fashion   # the ViT of the token-pruning benchmark
    python scripts/fashion_originals.py --models resnet50_fashion   # torchvision's resnet50 at 32 px RGB

One recipe for every benchmark (bench_channel_pruning, bench_lowrank, bench_finetune), so their tables
compare methods on the same converged network (ViTs: AdamW, see ``VIT_RECIPES``): all 60,000 training
images, ``EPOCHS`` epochs of
``amc.models.train_classifier`` (SGD-Nesterov, OneCycle, max lr ``LR``, batch 128, seed 0), accuracy on
the official 10,000-image test set (never used for any choice). Weights are cached under
``$AMC_BENCH_CACHE`` (default ``~/.cache/amc_bench``) with the recipe in the file name, and a JSON
beside them records accuracy and training time. ``--ship`` copies them (safetensors + JSON) into
``scripts/originals/``, which is committed and read first, so a fresh machine skips the ~25 min of
training per network and every session's benchmarks start from the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from amc.data import fashion_mnist_loaders  # noqa: E402
from amc.models import create, evaluate, train_classifier  # noqa: E402
from amc.export.atomic import atomic_path, atomic_write  # noqa: E402

EPOCHS = 8
LR = 0.05
BATCH = 128
# ViTs train with AdamW (SGD leaves them far behind): model -> (optimizer, lr, weight decay, epochs)
VIT_RECIPES = {"vit_fashion": ("adamw", 1e-3, 0.05, 6)}
# torchvision architectures trained here on Fashion-MNIST (their ImageNet weights do not ship offline):
# model -> (torchvision constructor, input side in px, epochs, train_limit). RGB copies of the images at
# 32 px through torchvision's own stem; cached, not shipped (resnet50 is 94 MB).
TORCHVISION = {"resnet50_fashion": ("resnet50", 32, 2, 20000)}
CACHE = Path(os.environ.get("AMC_BENCH_CACHE", Path.home() / ".cache" / "amc_bench"))
SHIPPED = HERE / "originals"  # committed copies (safetensors: loading runs no code)


def recipe(name: str, epochs: int = EPOCHS, train_limit: Optional[int] = None, lr: float = LR,
           seed: int = 0) -> Dict[str, Any]:
    return {"model": name, "epochs": epochs, "train_limit": train_limit, "lr": lr, "batch": BATCH, "seed": seed}


def _stem(r: Dict[str, Any]) -> str:
    n = "all" if r["train_limit"] is None else str(r["train_limit"])
    return f"{r['model']}_fmnist_n{n}_e{r['epochs']}_lr{r['lr']}_b{r['batch']}_s{r['seed']}"


def input_format(name: Optional[str]) -> Dict[str, Any]:
    """fashion_mnist_loaders keyword arguments for `name`'s inputs (28 px grey unless TORCHVISION says)."""
    if name in TORCHVISION:
        return {"image_size": TORCHVISION[name][1], "channels": 3}
    return {}


def loaders(train_limit: Optional[int] = None, val_limit: Optional[int] = None, seed: int = 0,
            name: Optional[str] = None):
    return fashion_mnist_loaders(batch_size=BATCH, train_limit=train_limit, val_limit=val_limit, seed=seed,
                                 **input_format(name))


def create_model(name: str) -> nn.Module:
    if name in TORCHVISION:
        import torchvision

        return getattr(torchvision.models, TORCHVISION[name][0])(num_classes=10)
    return create(name)


def original(name: str, epochs: int = EPOCHS, train_limit: Optional[int] = None, lr: float = LR,
             seed: int = 0) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model in eval mode, info)``; trains and caches on first use. info: recipe, test acc, seconds."""
    opt, wd = "sgd", 5e-4
    if name in VIT_RECIPES:
        opt, lr, wd, epochs = VIT_RECIPES[name]
    if name in TORCHVISION:
        epochs, train_limit = TORCHVISION[name][2:]
    r = recipe(name, epochs, train_limit, lr, seed)
    path = CACHE / (_stem(r) + ("" if opt == "sgd" else f"_{opt}") + ".pt")
    torch.manual_seed(seed)
    model = create_model(name)
    shipped = SHIPPED / (path.stem + ".safetensors")
    if shipped.exists() and shipped.with_suffix(".json").exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(shipped)))
        return model.eval(), json.loads(shipped.with_suffix(".json").read_text())
    if path.exists() and path.with_suffix(".json").exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), json.loads(path.with_suffix(".json").read_text())
    train, val = loaders(train_limit, seed=seed, name=name)
    t = time.perf_counter()
    res = train_classifier(model, train, val, epochs=epochs, lr=lr, seed=seed, optimizer=opt, weight_decay=wd)
    secs = time.perf_counter() - t
    model.eval()
    info = {**r, "test_acc": float(evaluate(model, val)["acc"]), "train_seconds": secs,
            "n_train": len(train.dataset), "n_test": len(val.dataset),
            "history": res.get("history", []), "torch_threads": torch.get_num_threads()}
    CACHE.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_write(path.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, default=str)
    return model, info


def ship(model: nn.Module, info: Dict[str, Any]) -> Path:
    """Write `model`'s weights and `info` into scripts/originals/ under the recipe's name (atomically)."""
    from safetensors.torch import save_file

    stem = _stem(recipe(info["model"], info["epochs"], info["train_limit"], info["lr"], info["seed"]))
    if info["model"] in VIT_RECIPES:
        stem += f"_{VIT_RECIPES[info['model']][0]}"
    SHIPPED.mkdir(exist_ok=True)
    out = SHIPPED / (stem + ".safetensors")
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_write(out.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, default=str)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vgg_small", "resnet20"])
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship", action="store_true", help="copy the weights into scripts/originals/ (committed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        model, info = original(name, epochs=args.epochs)
        if args.ship:
            ship(model, info)
        print(f"{name}: test acc {info['test_acc']:.4f} after {info['epochs']} epochs on {info['n_train']:,} "
              f"images ({info['train_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
