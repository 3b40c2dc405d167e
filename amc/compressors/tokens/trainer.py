"""`APTTrainer`: APT's three-pass training inside amc's BaseTrainer (checkpoints, resume, TensorBoard, DDP)."""
from __future__ import annotations

from typing import Any, Dict

from ...trainers.base import BaseTrainer
from .training import APTStep


class APTTrainer(BaseTrainer):
    """A BaseTrainer whose training batches run `APTStep` (plain, one action, full pruning); validation runs
    the network as it is (agents in batched mode after a step). Build it from `TokenPruning.agent_network()`:

        net, step = TokenPruning(vit, train, target_macs=0.6, epochs=0).agent_network()
        APTTrainer(train, val, network=net, optimizer=torch.optim.AdamW(net.parameters(), 1e-4),
                   criterion=nn.CrossEntropyLoss(), apt_step=step, epochs=1).run()   # criterion: validation
    """

    def __init__(self, *args: Any, apt_step: APTStep, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.apt_step = apt_step

    def get_train_batch_preds(self, batch_train_data: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        x, y = self.to_device(batch_train_data[0]), self.to_device(batch_train_data[1])
        return self.apt_step(x, y)

    def get_train_losses(self, batch_preds: Any, batch_train_data: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        return batch_preds
