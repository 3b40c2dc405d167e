"""BaseTrainer: the seed's CIFAR10Trainer (Code-3), hooks and kwargs, schedulers, TensorBoard, resume, bad input."""
from __future__ import annotations

import hashlib
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import TinyCNN, digits_loaders, seed_everything  # noqa: E402

from amc.errors import DataError, LoadError, TrainingError  # noqa: E402
from amc.trainers import BaseTrainer, SoftFilterPruning, TrainerCallback  # noqa: E402
from amc.trainers.basedistiller import *  # noqa: E402,F401,F403  (seed import spelling)
from amc.trainers.basetrainer import *  # noqa: E402,F401,F403

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------- Code-3, verbatim but imports
# <class CIFAR10Trainer>
class CIFAR10Trainer(BaseTrainer):
    
    # <method: __init__>
    def __init__(self, 
        train_loader,  val_loader,  eval_loader, 
        network, 
        criterion, optimizer, scheduler, 
        epochs, 
        device, tbx_writer, checkpoints_folder, additional_args):
        super(CIFAR10Trainer, self).__init__(
            train_loader = train_loader, 
            val_loader = val_loader, 
            eval_loader = eval_loader, 
            network = network, 
            criterion = criterion, 
            optimizer = optimizer, 
            scheduler = scheduler, 
            epochs = epochs, 
            device = device, 
            tbx_writer = tbx_writer, 
            checkpoints_folder = checkpoints_folder,
            additional_args = additional_args
            )
        pass
    # <method: __init__>
    
    # <method: __get_val_batch_preds__>
    def __get_val_batch_preds__(self, batch_val_data, *args, **kwargs):
        """ This is method must be overload. User overload it to get val predicts of network"""
        inputs = batch_val_data[0]
        if self._device:
            inputs = inputs.to(self._device)
        return self._network(inputs)
    # <method: __get_val_batch_preds__>
    
    # <method: __get_val_losses__>
    def __get_val_losses__(self, batch_preds, batch_val_data, *args, **kwargs):
        """ This is method must be overload. User overload it to get val loss using loss function of network"""
        batch_val_lables = batch_val_data[1]
        if self._device:
            batch_val_lables = batch_val_lables.to(self._device)
        #   endif
        loss = self._criterion(batch_preds, batch_val_lables)
        return {'total_loss': loss}
    # <method: __get_val_losses__>              
    
    # <method: __get_train_batch_preds__>
    def __get_train_batch_preds__(self, batch_train_data, *args, **kwargs):
        """ This is method must be overload. User overload it to get train predicts of network"""
        inputs = batch_train_data[0]
        if self._device:
            inputs = inputs.to(self._device)
        return self._network(inputs)
    # <method: __get_train_batch_preds__>
    
    # <method: __get_train_losses__>
    def __get_train_losses__(self, batch_preds, batch_train_data, *args, **kwargs):
        """ This is method must be overload. User overload it to get training loss using loss function of network"""
        batch_train_lables = batch_train_data[1]
        if self._device:
            batch_train_lables = batch_train_lables.to(self._device)
        #   endif
        loss = self._criterion(batch_preds, batch_train_lables)                
        return {'total_loss': loss}
    # <method: __get_train_losses__>

    # <method: __if_stop_trainning__>
    def __if_stop_trainning__(self, *args, **kwargs):
        for param in self._optimizer.param_groups:
            lr=param["lr"]
        #   endfor
        if lr < kwargs['stop_lr']:
            return True
        #   endif
        return False
    # <method: __if_stop_trainning__>

# <class CIFAR10Trainer>


# ---------------------------------------------------------------------------- helpers
class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def fake_cifar_loaders(n_train=64, n_val=32, batch=16):
    g = torch.Generator().manual_seed(1)
    xtr, ytr = torch.randn(n_train, 3, 8, 8, generator=g), torch.randint(0, 10, (n_train,), generator=g)
    xva, yva = torch.randn(n_val, 3, 8, 8, generator=g), torch.randint(0, 10, (n_val,), generator=g)
    return (DataLoader(TensorDataset(xtr, ytr), batch_size=batch, shuffle=True),
            DataLoader(TensorDataset(xva, yva), batch_size=batch))


def make_trainer(cls=BaseTrainer, epochs=2, folder=None, tbx=None, scheduler="step", callbacks=(), dropout=0.0,
                 train=None, val="default", seed=0, **kwargs):
    seed_everything(seed)
    tr, va = digits_loaders(batch_size=32, n_train=192, n_val=64)
    train = tr if train is None else train
    val = va if val == "default" else val
    net = TinyCNN(width=4, dropout=dropout)
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = {"step": lambda: optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
             "plateau": lambda: optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
             None: lambda: None}[scheduler]()
    return cls(train, val, None, net, nn.CrossEntropyLoss(), opt, sched, epochs, "cpu", tbx,
               str(folder) if folder else None, None, callbacks=list(callbacks), progress=False, **kwargs)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_scalars(log_dir: Path) -> dict:
    """Parse TensorBoard event files with tensorboardX's protobufs (TFRecord framing: len, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {log_dir}"
    for path in files:
        raw = path.read_bytes()
        pos = 0
        while pos + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            data = raw[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(data)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# ---------------------------------------------------------------------------- seed compatibility
def test_seed_cifar10_trainer_runs_and_stops_via_hook(tmp_path):
    seed_everything(0)
    trainloader, valloader = fake_cifar_loaders()
    net = SmallConvNet()
    optimizer = optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    # threshold=0.5: no epoch "improves" by 50%, so the LR drops 10x every epoch after the first.
    scheduler = optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, threshold=0.5, patience=0, min_lr=1e-9)
    tbx_writer = SummaryWriter(log_dir=str(tmp_path / "run_name"))  # noqa: F405 (from the star import)
    trainer = CIFAR10Trainer(
        train_loader=trainloader, val_loader=valloader, eval_loader=None, network=net,
        criterion=nn.CrossEntropyLoss(), optimizer=optimizer, scheduler=scheduler, epochs=50,
        device="cuda:0" if torch.cuda.is_available() else "cpu", tbx_writer=tbx_writer,
        checkpoints_folder=str(tmp_path / "ckpt"), additional_args=None)
    history = trainer.__run__(stop_lr=1e-6)
    tbx_writer.close()
    # 1e-4 -> 1e-5 -> 1e-6 -> 1e-7 < stop_lr: the hook stops after epoch 4, far before 50.
    assert len(history) == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-7)
    assert trainer.epoch == 4
    assert (tmp_path / "ckpt" / "last.pth").is_file() and (tmp_path / "ckpt" / "best.pth").is_file()
    assert set(history[0]["val"]) == {"total_loss", "accuracy"}


def test_seed_and_pythonic_hooks_are_one_code_path():
    """A subclass overriding the Pythonic names trains to the same weights as the seed-named one."""

    class Pythonic(BaseTrainer):
        def get_train_batch_preds(self, batch, *args, **kwargs):
            return self._network(batch[0].to(self._device))

        def get_train_losses(self, preds, batch, *args, **kwargs):
            return {"total_loss": self._criterion(preds, batch[1])}

    results = []
    for cls in (CIFAR10Trainer, Pythonic):
        seed_everything(3)
        tr, va = fake_cifar_loaders()
        net = SmallConvNet()
        opt = optim.SGD(net.parameters(), lr=0.05)
        if cls is CIFAR10Trainer:
            trainer = cls(tr, va, None, net, nn.CrossEntropyLoss(), opt, None, 2, "cpu", None, None, None)
            trainer.run(stop_lr=0.0)  # Pythonic entry point on a seed-style subclass
        else:
            trainer = cls(tr, va, None, net, nn.CrossEntropyLoss(), opt, None, 2, "cpu", None, None, None)
            trainer.__run__()
        results.append(trainer.module.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert CIFAR10Trainer.get_train_losses is CIFAR10Trainer.__get_train_losses__
    assert Pythonic.__get_train_losses__ is Pythonic.get_train_losses


def test_run_kwargs_reach_every_hook():
    seen = {}

    class Recording(BaseTrainer):
        def __get_train_batch_preds__(self, batch, *args, **kwargs):
            seen.setdefault("train_preds", kwargs)
            return super().__get_train_batch_preds__(batch, *args, **kwargs)

        def __get_train_losses__(self, preds, batch, *args, **kwargs):
            seen.setdefault("train_losses", kwargs)
            return super().__get_train_losses__(preds, batch, *args, **kwargs)

        def get_val_batch_preds(self, batch, *args, **kwargs):
            seen.setdefault("val_preds", kwargs)
            return super().get_val_batch_preds(batch, *args, **kwargs)

        def get_val_losses(self, preds, batch, *args, **kwargs):
            seen.setdefault("val_losses", kwargs)
            return super().get_val_losses(preds, batch, *args, **kwargs)

        def __if_stop_trainning__(self, *args, **kwargs):
            seen.setdefault("stop", kwargs)
            return kwargs["stop_after"] <= self.epoch

    trainer = make_trainer(Recording, epochs=5, scheduler=None)
    history = trainer.__run__(stop_after=2, marker="m")
    assert len(history) == 2
    assert set(seen) == {"train_preds", "train_losses", "val_preds", "val_losses", "stop"}
    assert all(kw == {"stop_after": 2, "marker": "m"} for kw in seen.values())


# ---------------------------------------------------------------------------- schedulers and logging
def test_step_scheduler_steps_once_per_epoch():
    trainer = make_trainer(epochs=3, scheduler="step")
    history = trainer.run()
    assert [h["lr"] for h in history] == pytest.approx([0.05, 0.025, 0.0125])
    assert trainer._scheduler.last_epoch == 3


def test_plateau_scheduler_steps_on_validation_total_loss():
    seen = []

    class Spy(optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics, *args, **kwargs):
            seen.append(float(metrics))
            return super().step(metrics, *args, **kwargs)

    seed_everything(0)
    tr, va = digits_loaders(batch_size=32, n_train=192, n_val=64)
    net = TinyCNN(width=4)
    opt = optim.SGD(net.parameters(), lr=0.05)
    trainer = BaseTrainer(tr, va, None, net, nn.CrossEntropyLoss(), opt, Spy(opt, patience=0), 3, "cpu", None,
                          None, None, progress=False)
    history = trainer.run()
    assert seen == [h["val"]["total_loss"] for h in history]
    assert seen != [h["train"]["total_loss"] for h in history]


def test_tensorboard_gets_losses_lr_and_validation_metrics(tmp_path):
    class TwoLosses(BaseTrainer):
        def get_train_losses(self, preds, batch, *args, **kwargs):
            ce = self._criterion(preds, batch[1])
            reg = 1e-3 * sum(p.pow(2).sum() for p in self._network.parameters())
            return {"total_loss": ce + reg, "ce": ce, "l2": reg}

    trainer = make_trainer(TwoLosses, epochs=2, tbx=str(tmp_path / "tb"))
    history = trainer.run()
    trainer._logger.close()
    scalars = read_scalars(tmp_path / "tb")
    for tag in ("train/total_loss", "train/ce", "train/l2", "train/lr", "train_epoch/total_loss", "lr",
                "val/total_loss", "val/accuracy"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert len(scalars["train/total_loss"]) == 2 * 6  # 192 samples / 32 per batch, per epoch
    assert [v for _, v in scalars["lr"]] == pytest.approx([0.05, 0.025])
    assert [v for _, v in scalars["val/total_loss"]] == pytest.approx([h["val"]["total_loss"] for h in history])
    acc = [v for _, v in scalars["val/accuracy"]]
    assert all(0.0 <= a <= 1.0 for a in acc) and acc[-1] > 0.2  # digits is easy; random would be ~0.1


def test_accuracy_only_for_classification_outputs():
    class Regression(BaseTrainer):
        def get_val_losses(self, preds, batch, *args, **kwargs):
            return {"total_loss": nn.functional.mse_loss(preds, batch[1])}

        get_train_losses = get_val_losses

    seed_everything(0)
    x, y = torch.randn(40, 5), torch.randn(40, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    net = nn.Linear(5, 2)
    trainer = Regression(loader, loader, None, net, None, optim.SGD(net.parameters(), lr=0.1), None, 1, "cpu",
                         None, None, None, progress=False)
    history = trainer.run()
    assert set(history[0]["val"]) == {"total_loss"}


def test_amp_flag_only_takes_effect_on_cuda():
    if torch.cuda.is_available():
        trainer = make_trainer(epochs=1, amp=True, device=None)
        assert trainer._scaler is not None
    else:
        with pytest.warns(RuntimeWarning, match="amp=True needs CUDA"):
            trainer = make_trainer(epochs=1, amp=True)
        assert trainer._scaler is None and trainer.device.type == "cpu"
        assert trainer.run()[0]["train"]["total_loss"] > 0


# ---------------------------------------------------------------------------- resume after a crash
class NoisyDigits(Dataset):
    """Augments with python, numpy and torch RNGs so a resume must restore all three."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        noise = 0.05 * (random.random() + float(np.random.rand()) + float(torch.rand(())))
        return self.x[i] + noise, self.y[i]


class Crashing(BaseTrainer):
    crash_at_step = None

    def get_train_losses(self, preds, batch, *args, **kwargs):
        if self.crash_at_step is not None and self.global_step == self.crash_at_step:
            raise KeyboardInterrupt("simulated crash mid-epoch")
        return super().get_train_losses(preds, batch, *args, **kwargs)


def _resume_trainer(folder, crash_at=None, resume=False, init_seed=0):
    from _ddp_worker import digits_tensors

    seed_everything(init_seed)
    xtr, ytr, xva, yva = digits_tensors(192, 64)
    train = DataLoader(NoisyDigits(xtr, ytr), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xva, yva), batch_size=32)
    net = TinyCNN(width=4, dropout=0.3)
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    Crashing.crash_at_step = crash_at
    return Crashing(train, val, None, net, nn.CrossEntropyLoss(), opt, sched, 4, "cpu", None, str(folder), None,
                    callbacks=[SoftFilterPruning(0.25, start_epoch=1)], resume=resume, progress=False)


def test_resume_after_mid_epoch_crash_matches_uninterrupted_run(tmp_path):
    reference = _resume_trainer(tmp_path / "ref")
    ref_history = reference.run()
    ref_state = reference.module.state_dict()

    crashed = _resume_trainer(tmp_path / "crash", crash_at=6 * 2 + 3)  # 6 batches/epoch: dies inside epoch 3
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    saved = torch.load(tmp_path / "crash" / "last.pth", weights_only=False)
    assert saved["epoch"] == 2

    # A new process would build everything again with arbitrary RNG state; resume restores it all.
    resumed = _resume_trainer(tmp_path / "crash", resume=True, init_seed=123)
    history = resumed.run()
    state = resumed.module.state_dict()
    assert [k for k in state if not torch.equal(state[k], ref_state[k])] == []
    assert history == ref_history
    assert resumed._optimizer.param_groups[0]["lr"] == reference._optimizer.param_groups[0]["lr"]
    assert resumed.callbacks[0].pruned_filters() == reference.callbacks[0].pruned_filters()


def test_resume_as_run_kwarg_and_finished_run_is_a_no_op(tmp_path):
    first = make_trainer(epochs=2, folder=tmp_path)
    first.run()
    digest = file_digest(tmp_path / "last.pth")
    again = make_trainer(epochs=2, folder=tmp_path, seed=9)
    history = again.run(resume=True)
    assert len(history) == 2 and again.epoch == 2
    assert file_digest(tmp_path / "last.pth") == digest  # nothing retrained, nothing rewritten
    # Raising `epochs` continues a finished run from its last checkpoint.
    longer = make_trainer(epochs=3, folder=tmp_path, seed=9)
    history = longer.run(resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert torch.load(tmp_path / "last.pth", weights_only=False)["epoch"] == 3


def test_best_checkpoint_tracks_best_validation_loss(tmp_path):
    trainer = make_trainer(epochs=3, folder=tmp_path)
    history = trainer.run()
    best = torch.load(tmp_path / "best.pth", weights_only=False)
    last = torch.load(tmp_path / "last.pth", weights_only=False)
    losses = [h["val"]["total_loss"] for h in history]
    assert best["epoch"] == 1 + losses.index(min(losses))
    assert last["epoch"] == 3 and best["best_metric"] == pytest.approx(min(losses))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files behind


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("returned, match", [
    (lambda loss: loss, "must return a dict"),
    (lambda loss: {"loss": loss}, "without 'total_loss'"),
    (lambda loss: {"total_loss": loss.detach()}, "does not require grad"),
    (lambda loss: {"total_loss": loss * torch.ones(3)}, "must be a scalar tensor"),
])
def test_bad_train_loss_dict_is_a_training_error(returned, match):
    class Bad(BaseTrainer):
        def get_train_losses(self, preds, batch, *args, **kwargs):
            return returned(self._criterion(preds, batch[1]))

    trainer = make_trainer(Bad, epochs=1)
    with pytest.raises(TrainingError, match=match):
        trainer.run()


def test_bad_val_loss_dict_is_a_training_error():
    class Bad(BaseTrainer):
        def __get_val_losses__(self, preds, batch, *args, **kwargs):
            return [self._criterion(preds, batch[1])]

    with pytest.raises(TrainingError, match=r"__get_val_losses__ returned list .* must return a dict"):
        make_trainer(Bad, epochs=1).run()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_and_keeps_last_good_checkpoint(tmp_path, bad):
    make_trainer(epochs=1, folder=tmp_path).run()
    digest = file_digest(tmp_path / "last.pth")

    class Diverging(BaseTrainer):
        def get_train_losses(self, preds, batch, *args, **kwargs):
            loss = self._criterion(preds, batch[1])
            return {"total_loss": loss * bad if self.global_step >= 8 else loss}

    trainer = make_trainer(Diverging, epochs=3, folder=tmp_path, resume=True)
    with pytest.raises(TrainingError, match=r"non-finite loss total_loss=(nan|inf).*epoch 2, batch 3.*"
                                            r"last good checkpoint .*last\.pth.* was kept"):
        trainer.run()
    assert file_digest(tmp_path / "last.pth") == digest
    assert torch.load(tmp_path / "last.pth", weights_only=False)["epoch"] == 1
    assert trainer.epoch == 1 and len(trainer.history) == 1
    # no optimizer step was taken with the bad loss: the live weights are still finite
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())


def test_diverged_weights_are_never_checkpointed(tmp_path):
    class Poison(TrainerCallback):
        def on_epoch_end(self, trainer, epoch):
            if epoch == 1:
                with torch.no_grad():
                    trainer.module.fc.weight[0, 0] = float("inf")

    trainer = make_trainer(epochs=3, folder=tmp_path, val=None, callbacks=[Poison()])
    with pytest.raises(TrainingError, match=r"'fc.weight' holds NaN/inf; refusing to checkpoint.*last\.pth"):
        trainer.run()
    assert torch.load(tmp_path / "last.pth", weights_only=False)["epoch"] == 1


def test_nan_inputs_are_reported_before_any_checkpoint(tmp_path):
    seed_everything(0)
    tr, va = digits_loaders(batch_size=32, n_train=64, n_val=32)
    x = tr.dataset.tensors[0].clone()
    x[5] = float("nan")
    bad_train = DataLoader(TensorDataset(x, tr.dataset.tensors[1]), batch_size=32)
    trainer = make_trainer(epochs=1, folder=tmp_path, train=bad_train)
    with pytest.raises(TrainingError, match="No checkpoint was written yet"):
        trainer.run()
    assert not (tmp_path / "last.pth").exists()


def test_empty_loaders_are_data_errors():
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match=r"train_loader has no batches \(dataset size 0"):
        make_trainer(epochs=1, train=empty).run()
    with pytest.raises(DataError, match=r"val_loader has no batches"):
        make_trainer(epochs=1, val=empty).run()

    class Nothing(IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(DataError, match="train_loader yielded no batches"):
        make_trainer(epochs=1, train=DataLoader(Nothing(), batch_size=4)).run()


def test_bad_constructor_and_resume_arguments(tmp_path):
    tr, va = digits_loaders(batch_size=32, n_train=64, n_val=32)
    net = TinyCNN(width=4)
    with pytest.raises(TrainingError, match="network must be a torch.nn.Module"):
        BaseTrainer(tr, va, None, "resnet18", nn.CrossEntropyLoss(), None, None, 1, "cpu", None, None, None)
    with pytest.raises(TrainingError, match="optimizer is None"):
        BaseTrainer(tr, va, None, net, nn.CrossEntropyLoss(), None, None, 1, "cpu", None, None, None)
    with pytest.raises(DataError, match="train_loader is None"):
        BaseTrainer(None, va, None, net, nn.CrossEntropyLoss(), optim.SGD(net.parameters(), lr=0.1), None, 1,
                    "cpu", None, None, None).run()
    with pytest.raises(LoadError, match="no such checkpoint file"):
        make_trainer(epochs=1, folder=tmp_path).run(resume=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="unreadable"):
        make_trainer(epochs=1, folder=tmp_path).run(resume=str(tmp_path / "junk.pth"))
    with pytest.raises(LoadError, match="needs checkpoints_folder"):
        make_trainer(epochs=1).run(resume=True)


def test_an_optimizer_over_another_module_is_refused():
    """Built over the model before amc.prune made a new network, it trained nothing and said nothing."""
    import amc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    pruned = amc.prune(model, example_inputs=x[:1], ratio=0.5)
    with pytest.raises(TrainingError, match="none of them the network's.*network.parameters"):
        BaseTrainer([(x, y)], None, None, pruned, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                    None, 1, "cpu", progress=False)
    head_only = torch.optim.SGD(list(pruned.parameters())[-2:], lr=0.1)  # a subset of its own: still allowed
    BaseTrainer([(x, y)], None, None, pruned, nn.CrossEntropyLoss(), head_only, None, 1, "cpu", progress=False).run()
