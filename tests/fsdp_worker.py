"""Run as two processes by tests/test_lm_distill.py (tests/helpers.run_two_processes): one CausalLMDistiller
step of a student sharded by FSDP2 (``fully_shard``, gloo on CPU), each rank on its half of the batch; rank 0
saves the loss and the whole gradients."""
import sys

import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from pcdistill.lm.distill import IGNORE, CausalLMDistiller, shifted_targets
from tests.helpers import init_process_group
from tests.test_lm_distill import V_T, even_batch, tiny_lm

if __name__ == "__main__":
    loss, out = sys.argv[1], sys.argv[2]
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher = tiny_lm(), tiny_lm(vocab=V_T, seed=1)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    ids, labels, mask = even_batch()
    count = (shifted_targets(labels, mask) != IGNORE).sum()  # the global count: each rank sums its tokens
    rows = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    distiller = CausalLMDistiller(student, teacher, loss=loss)
    total = sum(distiller.losses(student, ids[rows], labels[rows], attention_mask=mask[rows], num_items=count,
                                 progress=0.5).values())
    (total * world).backward()  # FSDP averages the gradients over the ranks
    grads = {name: p.grad.full_tensor() for name, p in student.named_parameters()}  # collective: every rank
    total = total.detach().reshape(1)
    dist.all_reduce(total)
    if rank == 0:
        save_file(grads | {"__loss__": total}, out)
    dist.destroy_process_group()
