"""Forward passes of an FSDP-sharded model, kept in step on every rank (sharded evaluation).

A model too large for one device is evaluated as it is trained: FSDP2 (``engine.parallel.
apply_fsdp``) keeps 1/N of every weight on each of the N ranks, and a forward pass all-gathers
one parameter group at a time (the root's final norm, the embedding, each decoder layer, the
next one prefetched while the current one computes, then the LM head in its own group) and
frees it after use. Every pass, real or idle, goes through the LM head. So each forward pass is a fixed sequence of collectives, and every rank must run the same number
of passes, or the ranks pair one pass's all-gathers with another's and hang.

Evaluation gives the ranks unequal work. The prompts are split over the ranks in whole batches
(a rank may have one batch fewer than another), and a generation runs as many decoding steps as
its longest sequence needs before an end-of-turn token, which differs from batch to batch.
Padding the prompt lists to equal batches would not make the decoding steps equal, and running
every rank on the same batches would give up the split of the work. Instead, :class:`Lockstep`
agrees on every pass:

* before each real forward pass, a rank says "busy" in a one-element all-reduce (MAX);
* a rank that has finished its share of a call (:meth:`Lockstep.drain`) says "idle" and, while
  any other rank is still busy, runs an idle pass (one token, result discarded) opposite each of
  that rank's passes; when every rank says "idle", all leave the call together.

Every rank therefore runs the same number of passes with no count known in advance, and each
batch is the batch a single process would run, so the results are exactly a single process's
(the all-gathered weights are bit copies of the checkpoint's). The agreement costs one tiny
all-reduce per forward pass (a CPU tensor: gloo, beside NCCL under CUDA), nothing next to the
weights a pass gathers. Replicated or single-process models run their passes directly.

Every pass of a sharded model runs in inference mode: FSDP2 allocates its gathered-weight buffers
in the mode of the first pass, and a pass in another mode could not write into them.

The rule for callers: route every forward pass of the model through one ``Lockstep`` and call
``drain()`` on every rank at the end of each call that runs passes, before any other collective
(such as gathering the results), and with the same sequence of calls on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel


class Lockstep:
    """Calls ``model`` (``lockstep(*args, **kwargs)`` is ``model(*args, **kwargs)``), agreeing
    with the other ranks before every pass when the model is FSDP-sharded over several ranks."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active = parallel.is_distributed() and parallel.is_sharded(model) and dist.get_world_size() > 1
        self.idle_passes = 0  # passes run only to keep step with busier ranks

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.model(*args, **kwargs)
        self._anyone_busy(True)
        with torch.inference_mode():
            return self.model(*args, **kwargs)

    def drain(self) -> None:
        """This rank's share is done: run idle passes opposite the other ranks' remaining passes,
        and return when every rank has drained. A collective (no-op when not active)."""
        if not self.active:
            return
        while self._anyone_busy(False):
            device = self.model.model.embed_tokens.weight.device
            with torch.inference_mode():
                self.model(torch.zeros((1, 1), dtype=torch.long, device=device))  # through the LM head, as every real pass
            self.idle_passes += 1

    @staticmethod
    def _anyone_busy(busy: bool) -> bool:
        flag = torch.tensor([int(busy)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


__all__ = ["Lockstep"]
