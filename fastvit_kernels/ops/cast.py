"""Dtype casts of several tensors in one launch (kernels/cast.py): what a step plan's batch of autocast's casts runs
instead of torch._foreach_copy_, which launches a kernel per tensor when the dtypes differ.

  copy_cast(dsts, srcs)        dsts[i].copy_(srcs[i]) for every i, CAST_PAIRS pairs a launch
  copy_cast_unchecked(...)     the same without the checks (copy_cast after them; the cast benchmark's row)
  copy_cast_ref(dsts, srcs)    torch._foreach_copy_(dsts, srcs)
  CastBatch                    a step plan's batch of casts into fresh outputs, its launches made once per sources
  KeptCasts                    a step plan's batch of weight casts into outputs kept from one replay to the next

Only step plans call it, inside their replays, which neither autograd nor torch.compile see: a plain function, no
custom op.
"""

import weakref

import torch

from ..configs import CAST_BLOCK, CAST_WARPS, cast_kernel_on
from ..kernels.cast import CAST_PAIRS, cast_pairs_kernel
from ..tuning import launch_kernel
from . import _common  # _common.interpreting read per call: the host benchmark stands CPU tensors in for a GPU's
from ._common import cdiv

CAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def copy_cast(dsts, srcs) -> None:
    """dsts[i].copy_(srcs[i]) for each pair: contiguous tensors of the same shape on one device, the sources of one
    float dtype and the destinations of one (as a batch of casts is). On a GPU and under the interpreter our kernel,
    CAST_PAIRS pairs a launch; elsewhere (a CPU without the interpreter), or with FASTVIT_CAST_KERNEL=0,
    torch._foreach_copy_."""
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_cast: {len(dsts)} destinations but {len(srcs)} sources")
    if not dsts:
        return
    device, src_dtype, dst_dtype = srcs[0].device, srcs[0].dtype, dsts[0].dtype
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d.shape != s.shape or d.device != device or s.device != device:
            raise ValueError(
                f"copy_cast: pair {i} has {tuple(d.shape)} on {d.device} from {tuple(s.shape)} on {s.device}"
            )
        if s.dtype != src_dtype or d.dtype != dst_dtype:
            raise TypeError(f"copy_cast: pair {i} casts {s.dtype} to {d.dtype}, the first {src_dtype} to {dst_dtype}")
        if not (d.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"copy_cast: pair {i} is not contiguous")
    copy_cast_unchecked(dsts, srcs)


def copy_cast_unchecked(dsts, srcs) -> None:
    """copy_cast without its checks (~1 us a pair of host time): for a step plan's batches, whose pairs are what
    copy_cast accepts by construction (cast_batches._batch: contiguous casts to a new tensor of the same shape, grouped
    by dtypes and device)."""
    _run(dsts, srcs, _launches(dsts, srcs))


def _run(dsts, srcs, launches) -> None:
    """The casts of srcs into dsts: `launches` of our kernel (_launches), or torch's copy where that is None."""
    if launches is None:
        torch._foreach_copy_(dsts, srcs)
        return
    for grid, args, consts in launches:
        launch_kernel(cast_pairs_kernel, grid, args, consts)


def _launches(dsts, srcs):
    """The launches of our kernel that cast srcs into dsts, as (grid, args, constexprs), or None where torch's
    _foreach_copy_ does it (a CPU without the interpreter, dtypes the kernel does not take, FASTVIT_CAST_KERNEL=0)."""
    device, src_dtype, dst_dtype = srcs[0].device, srcs[0].dtype, dsts[0].dtype
    ours = (device.type == "cuda" or _common.interpreting()) and src_dtype in CAST_DTYPES and dst_dtype in CAST_DTYPES
    if not ours or not cast_kernel_on():
        return None
    pairs = [(s, d) for d, s in zip(dsts, srcs) if s.numel() > 0]
    consts = {"BLOCK": CAST_BLOCK} if _common.interpreting() else {"BLOCK": CAST_BLOCK, "num_warps": CAST_WARPS}
    launches = []
    for first in range(0, len(pairs), CAST_PAIRS):
        group = pairs[first : first + CAST_PAIRS]
        args = [a for s, d in group for a in (s, d, s.numel())]
        args += [None, None, 0] * (CAST_PAIRS - len(group))
        chunks = cdiv(max(s.numel() for s, _ in group), CAST_BLOCK)
        launches.append(((chunks, len(group)), args, consts))
    return launches


def _new_sources(srcs, seen) -> bool:
    """Other source objects than the launches were made for (seen: None before the first call). The line that calls
    passes a fixed count, so the objects alone are compared."""
    return seen is None or any(a is not b for a, b in zip(srcs, seen))


class CastBatch:
    """A step plan's batch of casts of one dtype pair into fresh outputs (the weight gradients' casts back to the
    weights' dtype): copy_cast_unchecked, with its launches' argument lists made once while the same source objects
    come (a replay's arena views, arena.py) and only the tensors put in at each call (~45 us of host time for 25
    pairs made afresh on the CPU box, ~150 pairs a CIFAR-10 training step). Between calls it holds no tensor: the
    sources by weak references (an arena view held here would keep the whole buffer after arena.release())."""

    def __init__(self):
        self.srcs = None  # weak references to the sources the launches were made for
        self.launches = None  # [(grid, args, constexprs)] or None for torch's copy (_launches)
        self.slots = []  # (launch, argument position, index in srcs + dsts): where each call's tensors go

    def __call__(self, dsts, srcs):
        if self.srcs is None or any(r() is not s for r, s in zip(self.srcs, srcs)):
            self.launches, self.srcs = _launches(dsts, srcs), [weakref.ref(s) for s in srcs]
            index = {id(t): i for i, t in enumerate((*srcs, *dsts))}
            self.slots = [
                (k, pos, index[id(args[pos])])
                for k, (_, args, _) in enumerate(self.launches or ())
                for pos in range(len(args))
                if pos % 3 != 2 and args[pos] is not None  # (source, output, numel) a pair
            ]
        tensors = (*srcs, *dsts)
        for k, pos, i in self.slots:
            self.launches[k][1][pos] = tensors[i]
        _run(dsts, srcs, self.launches)
        for k, pos, _ in self.slots:  # the caller's tensors: not held until the next call
            self.launches[k][1][pos] = None


class KeptCasts:
    """A step plan's early batch of autocast's casts of the model's tensors (cast_batches.py): called with the
    sources, it casts them into outputs it allocated on its first call and returns those, every call. The casts run
    every call (a weight may change in place without a new version: p.data.mul_()), the ~150 allocations of a
    CIFAR-10 step's weight copies do not. The outputs are held between calls (the weights' size in the compute dtype:
    43 MB for vit_cifar10 in bf16) until the plan goes (plan.forget). A training step's backward reads them, and the
    next forward writes them: after that backward in a training loop; where two forwards come before their backwards,
    the second writes the same values unless the weights changed in between: an in-place change makes the plan refuse
    the first backward (plan.TrainingPlan); one through .data, which autograd does not track either, reaches it
    (eager's would read its own older copies). Torch's copy or our kernel
    (FASTVIT_CAST_KERNEL) is chosen when the sources are first seen."""

    def __init__(self, templates: list, keys: list):
        """templates: empty_like of each gives its output; keys: each cast's (source dtype, output dtype, device)."""
        self.templates = templates
        self.groups = {}  # key -> the indices of its casts: the launches of one dtype pair each
        for i, key in enumerate(keys):
            self.groups.setdefault(key, []).append(i)
        self.outs = None
        self.srcs = None  # the source objects of the launches below, which stay right while the same objects come
        self.launches = None  # per group (outputs, sources, [(grid, args, constexprs)] or None for torch's copy)

    def __call__(self, *srcs):
        if self.outs is None:
            self.outs = [torch.empty_like(t) for t in self.templates]
        if _new_sources(srcs, self.srcs):
            # a launch reads each tensor's address when it runs: a parameter given new .data is still the object
            self.launches = []
            for ids in self.groups.values():
                dsts, group = [self.outs[i] for i in ids], [srcs[i] for i in ids]
                self.launches.append((dsts, group, _launches(dsts, group)))
            self.srcs = srcs
        for dsts, group, launches in self.launches:
            _run(dsts, group, launches)
        return self.outs


def copy_cast_ref(dsts, srcs) -> None:
    torch._foreach_copy_(list(dsts), list(srcs))
