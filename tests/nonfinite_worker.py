"""Run as two processes by tests/test_ddp.py, under torchrun or in a process group of its own (when
PCDISTILL_TEST_STORE is set): ``pcdistill train ARGS`` where rank 1's batch of global step ``BAD_STEP`` is NaN,
so that only that rank's loss is not finite."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed

from pcdistill import cli
from pcdistill.engine import trainer

BAD_RANK, BAD_STEP = 1, 5


class NaNBatch:
    """A train loader whose batch ``index`` of the first epoch holds NaN inputs."""

    def __init__(self, loader, index: int):
        self.loader, self.index, self.epoch, self.start = loader, index, 0, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch
        self.loader.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        for batch, (inputs, targets) in enumerate(self.loader, start=self.start):
            yield (torch.full_like(inputs, float("nan")) if (self.epoch, batch) == (0, self.index) else inputs), targets


def build_task(cfg, ctx, build=trainer.build_task):
    task = build(cfg, ctx)
    if ctx.rank == BAD_RANK:
        task.train_loader = NaNBatch(task.train_loader, BAD_STEP - 1)
    return task


if __name__ == "__main__":
    # a rank left alone in a collective (the cross-rank check missing) fails after this, not after 30 minutes
    wait = timedelta(seconds=30)
    if "PCDISTILL_TEST_STORE" in os.environ:
        from tests.helpers import init_process_group
        init_process_group(timeout=wait)
    else:
        torch.distributed.init_process_group("gloo", timeout=wait)  # torchrun's rendezvous, from the environment
    trainer.build_task = build_task
    raise SystemExit(cli.main(sys.argv[1:]))
