"""A step plan's batches of autocast's casts, through torch._foreach_copy_:

  cast_batch(dsts, srcs)       dsts[i].copy_(srcs[i]) for every i: a batch of casts into fresh outputs
  KeptCasts                    a step plan's batch of weight casts into outputs kept from one replay to the next

torch's foreach copy takes a whole batch in one call: vit_cifar10's 152 weights (fp32 to bf16) in 0.065 ms of GPU time
and 0.17 ms of host time on an H200 (torch 2.11, 2026-11-28), where our cast kernel, eight tensors a launch, took
0.096 and 1.13 ms: nothing to fuse into a cast, so torch's runs.

Only step plans call these, inside their replays, which neither autograd nor torch.compile see: plain functions, no
custom op.
"""

import torch


def cast_batch(dsts, srcs) -> None:
    """A step plan's batch of casts of one dtype pair into fresh outputs (the weight gradients' casts back to the
    weights' dtype): pairs of the same shape on one device, as cast_batches._batch groups them."""
    torch._foreach_copy_(list(dsts), list(srcs))


class KeptCasts:
    """A step plan's early batch of autocast's casts of the model's tensors (cast_batches.py): called with the
    sources, it casts them into outputs it allocated on its first call and returns those, every call. The casts run
    every call (a weight may change in place without a new version: p.data.mul_()), the ~150 allocations of a
    CIFAR-10 step's weight copies do not. The outputs are held between calls (the weights' size in the compute dtype:
    43 MB for vit_cifar10 in bf16) until the plan goes (plan.forget). A training step's backward reads them, and the
    next forward writes them: after that backward in a training loop; where two forwards come before their backwards,
    the second writes the same values unless the weights changed in between: an in-place change makes the plan refuse
    the first backward (plan.TrainingPlan); one through .data, which autograd does not track either, reaches it
    (eager's would read its own older copies)."""

    def __init__(self, templates: list, keys: list):
        """templates: empty_like of each gives its output; keys: each cast's (source dtype, output dtype, device)."""
        self.templates = templates
        self.groups = {}  # key -> the indices of its casts: one foreach copy per dtype pair and device
        for i, key in enumerate(keys):
            self.groups.setdefault(key, []).append(i)
        self.outs = None

    def __call__(self, *srcs):
        if self.outs is None:
            self.outs = [torch.empty_like(t) for t in self.templates]
        for ids in self.groups.values():
            torch._foreach_copy_([self.outs[i] for i in ids], [srcs[i] for i in ids])
        return self.outs
