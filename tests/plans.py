"""Shared by the step-plan tests (tests/test_plan*.py): a small fused ViT, its calls with and without plans."""

import torch

from fastvit_kernels import ViT, plan

SMALL = dict(image_size=8, patch_size=4, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64)


def small_model(device, **kw):
    return ViT(**{**SMALL, **kw}, backend="triton").to(device).eval()


def unplanned(model, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("FASTVIT_PLAN", "0")
        with torch.no_grad():
            return model(x)


def calls(model, x, n):
    """n no-grad calls; the plan of x's signature after them (None: none)."""
    with torch.no_grad():
        outs = [model(x) for _ in range(n)]
    return outs, plan_for(model, x)


def plan_for(model, x):
    (p,) = [p for s, p in plan.plans(model).items() if s[0] == x.shape and s[2] == x.dtype] or [None]
    return p


def only_plan(model):
    (p,) = plan.plans(model).values()
    assert isinstance(p, plan.Plan), p
    return p


def lines_calling(p, fn) -> int:
    """How many lines of plan p's code (forward and backward) call fn (a class: any instance of it)."""
    # a training plan's source: the forward's function, then the backward's, each with its own recorder's names
    functions = ["def replay(" + f for f in p.source.split("def replay(")[1:]]
    scopes = [_code(p.fn).__globals__] + ([_code(p.bwd).__globals__] if hasattr(p, "bwd") else [])
    assert len(functions) == len(scopes)
    count = 0
    for source, scope in zip(functions, scopes):
        names = [n for n, v in scope.items() if v is fn or (isinstance(fn, type) and isinstance(v, fn))]
        count += sum(line.strip().split(" = ")[-1].startswith(f"{n}(") for line in source.splitlines() for n in names)
    return count


def _code(fn):
    """A plan's function as its source reads: the version that allocates afresh of an arena.ArenaReplay, or of a
    training step's forward or backward (arena.StepReplays' or FreshSteps' methods)."""
    steps = getattr(fn, "__self__", None)
    if steps is not None:
        return steps.fwd_fresh if fn.__name__ == "forward" else steps.bwd_fresh
    return getattr(fn, "fresh", fn)
