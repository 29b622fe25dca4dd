"""The arena of step plans' temporaries (fastvit_kernels/arena.py): which allocations are temporaries, a layout in
which no two alive together overlap, and a replay that allocates afresh when it cannot hold the arena. Replays that
take their temporaries from it compute what the forward computes: tests/test_plan*.py."""

import gc
import random
import weakref

import pytest
import torch
from plans import calls, only_plan, small_model, unplanned

from fastvit_kernels import arena, plan
from fastvit_kernels.lines import Line
from fastvit_kernels.ops import fused_patch_embed, gemm

CPU = torch.device("cpu")


def _alloc(name, shape=(4, 4), dtype=torch.float32):
    template = torch.empty((), dtype=dtype).expand(shape)
    return Line(f"{name} = empty_like(...)", [], [name], pure=True, alloc=template)


def test_temporaries_exclude_what_escapes_and_span_the_lines_that_read_their_views():
    lines = [
        _alloc("t0"),
        Line("launch(t0)", ["t0"]),
        Line("t1 = view(t0)", ["t0"], ["t1"], views=True),
        Line("launch(t1)", ["t1"]),  # t0's memory is read through its view here: t0's span ends here
        _alloc("t2"),
        Line("t3 = sum(t2)", ["t2"], ["t3"]),  # a new tensor: t3 returned does not keep t2
        _alloc("t4"),
        Line("t5 = view(t4)", ["t4"], ["t5"], views=True),  # returned: t4 is not a temporary
        Line("launch(x, t5)", ["x", "t5"]),
    ]
    temps = arena.temporaries(lines, keep={"x", "t3", "t5"})
    assert [(t.name, t.first, t.last, t.zeroed) for t in temps] == [("t0", 0, 3, False), ("t2", 4, 5, False)]


@pytest.mark.parametrize("seed", range(5))
def test_layout_never_overlaps_temporaries_alive_together(seed):
    rng = random.Random(seed)
    temps = []
    for k in range(60):
        first = rng.randrange(100)
        shape = (rng.randrange(0, 300),)
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.int32])
        temps.append(arena.Temp(f"t{k}", first, first + rng.randrange(15), torch.empty((), dtype=dtype).expand(shape)))
    offsets, total = arena.layout(temps)
    ends = [at + t[3].numel() * t[3].element_size() for at, t in zip(offsets, temps)]
    assert all(at % arena.ALIGN == 0 for at in offsets) and max(ends) <= total
    for i in range(len(temps)):
        for j in range(i):
            alive_together = temps[i][1] <= temps[j][2] and temps[j][1] <= temps[i][2]
            if alive_together:
                assert ends[i] <= offsets[j] or ends[j] <= offsets[i], (temps[i], temps[j])
    # no more than their sizes side by side, and reuse where spans do not meet
    assert total <= sum(-(-max(t[3].numel() * t[3].element_size(), 1) // arena.ALIGN) * arena.ALIGN for t in temps)


def test_zeroed_temporaries_share_the_start_of_the_zeroed_buffer():
    """Arrival counters (Temp.zeroed) are not placed in the buffer: every one is a view of the zeroed buffer's start,
    which is zero when allocated, and as large as the largest of them."""
    temps = [
        arena.Temp("t0", 0, 3, torch.empty(()).expand(40)),
        arena.Temp("t1", 1, 2, torch.empty((), dtype=torch.int32).expand(9), zeroed=True),
        arena.Temp("t2", 1, 4, torch.empty((), dtype=torch.int32).expand(300), zeroed=True),
    ]
    offsets, total = arena.layout(temps)
    assert offsets == [0, None, None] and total == arena.ALIGN and arena.zeroed_bytes(temps) == 1200
    a = arena.Arena(CPU)
    r = _replay(temps, a)
    assert r() == "kept" and a.zeros.numel() == 1200 and not a.zeros.any()
    base = a.zeros.data_ptr()
    assert [v.data_ptr() == base for v in r.views] == [False, True, True]
    assert r.views[0].untyped_storage().data_ptr() == a.buffer.data_ptr()
    assert [(v.shape, v.dtype) for v in r.views[1:]] == [((9,), torch.int32), ((300,), torch.int32)]


def _replay(temps, arena_):
    r = arena.ArenaReplay(lambda: "fresh", lambda: "kept", [], temps, CPU)
    r.arena = arena_
    return r


def test_a_replay_allocates_afresh_while_another_holds_the_arena():
    a = arena.Arena(CPU)
    temps = [arena.Temp("t0", 0, 1, torch.empty((), dtype=torch.bfloat16).expand(3, 5))]
    temps.append(arena.Temp("t1", 1, 2, torch.empty(()).expand(7)))
    r = _replay(temps, a)
    assert a.lock.acquire(blocking=False)  # another replay's call
    assert r() == "fresh" and r.views == []
    a.lock.release()
    assert r() == "kept" and not a.lock.locked()
    assert [(v.shape, v.dtype) for v in r.views] == [((3, 5), torch.bfloat16), ((7,), torch.float32)]
    base = a.buffer.data_ptr()
    assert all(v.untyped_storage().data_ptr() == base for v in r.views)
    assert r.views[0].data_ptr() + 30 <= r.views[1].data_ptr()  # alive together on line 1: apart


def test_views_move_to_a_grown_arena():
    a = arena.Arena(CPU)
    small = _replay([arena.Temp("t0", 0, 0, torch.empty(()).expand(4))], a)
    small()
    big = _replay([arena.Temp("t0", 0, 0, torch.empty(()).expand(4096))], a)
    big()  # grows the buffer: the small replay's views point into the old one until its next call
    assert small.views[0].untyped_storage().data_ptr() != a.buffer.data_ptr()
    small()
    assert small.views[0].untyped_storage().data_ptr() == a.buffer.data_ptr() == big.views[0].data_ptr()


def test_inference_and_training_replays_take_their_temporaries_from_the_arena(device, monkeypatch):
    model = small_model(device)
    x = torch.randn(3, 3, 8, 8, device=device)
    calls(model, x, 3)
    p = only_plan(model)
    assert isinstance(p.fn, arena.ArenaReplay) and len(p.fn.views) > 10
    # with the arena held elsewhere (another thread's replay), a replay allocates afresh and computes the same
    a = p.fn.arena
    assert a.lock.acquire(blocking=False)
    try:
        with torch.no_grad():
            fresh = model(x)
    finally:
        a.lock.release()
    with torch.no_grad():
        kept = model(x)
    assert torch.equal(fresh, kept) and torch.equal(kept, unplanned(model, x, monkeypatch))
    model.train()
    for _ in range(3):
        model(x).sum().backward()
    (t,) = [q for q in plan.plans(model).values() if isinstance(q, plan.TrainingPlan)]
    steps = t.bwd.__self__  # the forward's activations and the backward's temporaries: one layout
    assert isinstance(steps, arena.StepReplays) and t.fn.__self__ is steps
    assert len(steps.fwd_views) > 10 and len(steps.bwd_views) > 10


def test_without_the_arena_replays_allocate_afresh(device, monkeypatch):
    monkeypatch.setenv("FASTVIT_ARENA", "0")
    model = small_model(device)
    x = torch.randn(3, 3, 8, 8, device=device)
    outs, p = calls(model, x, 3)
    assert isinstance(p, plan.Plan) and not isinstance(p.fn, arena.ArenaReplay)
    assert torch.equal(outs[-1], unplanned(model, x, monkeypatch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams")
def test_replays_on_two_streams_wait_for_each_other(monkeypatch):
    """A replay on another stream than the arena's last user's waits for that stream's work before writing its
    temporaries: back-to-back replays on two streams, no synchronisation between them, each output as the forward's."""
    model = small_model("cuda")
    x = torch.randn(64, 3, 8, 8, device="cuda")
    calls(model, x, 3)
    expected = unplanned(model, x, monkeypatch)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    with torch.no_grad():
        for i in range(6):
            with torch.cuda.stream(streams[i % 2]):
                outs.append(model(x))
    torch.cuda.synchronize()
    assert all(torch.equal(o, expected) for o in outs)


def test_the_arena_goes_with_the_last_plan_that_used_it(device, monkeypatch):
    monkeypatch.setattr(arena, "_ARENAS", weakref.WeakValueDictionary())  # not the one other tests' plans hold
    model = small_model(device)
    x = torch.randn(3, 3, 8, 8, device=device)
    calls(model, x, 3)
    held = weakref.ref(only_plan(model).fn.arena)
    assert held().buffer is not None
    plan.forget(model)
    gc.collect()
    assert held() is None


@pytest.mark.parametrize("first", ["inference_mode", "training"])
def test_replays_in_and_out_of_inference_mode_share_the_arena(device, monkeypatch, first):
    """An evaluation under torch.inference_mode() and a training step share the device's arena in either order: the
    buffer and its views are normal tensors, which a training replay may write in place (an inference tensor made
    by the first user would refuse it)."""
    monkeypatch.setattr(arena, "_ARENAS", weakref.WeakValueDictionary())
    model = small_model(device)
    x = torch.randn(3, 3, 8, 8, device=device)

    def evaluate():
        model.eval()
        with torch.inference_mode():
            return model(x)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    for _ in range(3):
        if first == "inference_mode":
            evaluate()
        train()
        evaluate()
    with monkeypatch.context() as m:
        m.setenv("FASTVIT_PLAN", "0")
        out_ref, grads_ref = train()
        with torch.no_grad():
            model.eval()
            eval_ref = model(x)
    out, grads = train()
    assert torch.equal(out, out_ref) and all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
    assert torch.equal(evaluate(), eval_ref)
    views = [v for p in plan.plans(model).values() if isinstance(p.fn, arena.ArenaReplay) for v in p.fn.views]
    steps = [p.fn.__self__ for p in plan.plans(model).values() if isinstance(p, plan.TrainingPlan)]
    views += [v for s in steps for v in (*s.fwd_views, *s.bwd_views)]
    assert len(views) > 20 and not any(v.is_inference() for v in views)


def _training_plan(model, x):
    model.train()
    for _ in range(3):
        model(x).sum().backward()
    (t,) = [p for p in plan.plans(model).values() if isinstance(p, plan.TrainingPlan)]
    return t.fn.__self__


def _autocast(forward, kind):
    def run(x):
        with torch.autocast(kind, dtype=torch.bfloat16):
            return forward(x)

    return run


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_a_training_step_holds_the_arena_from_its_forward_to_its_backward(device, monkeypatch):
    """The forward's saved activations are views into the arena: the forward takes it and keeps it for its backward,
    which lets it go; a step dropped without a backward lets it go too. The activations and the backward's
    temporaries pack into their peak of live bytes (a stack: the backward frees them in about the reverse order)."""
    monkeypatch.setattr(arena, "_ARENAS", weakref.WeakValueDictionary())
    model = small_model(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    steps = _training_plan(model, x)
    a = steps.arena
    assert isinstance(steps, arena.StepReplays) and len(steps.fwd_views) > 10 and not a.lock.locked()
    out = model(x)
    assert a.lock.locked()
    base = a.buffer.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == base for v in steps.fwd_views)
    out.sum().backward()
    assert not a.lock.locked()
    out = model(x)
    assert a.lock.locked()
    del out  # the step's graph, its saved activations and its hold of the arena with it
    gc.collect()
    assert not a.lock.locked()
    assert steps.nbytes <= 1.1 * _peak_live(steps) + 64 * arena.ALIGN


def _peak_live(steps) -> int:
    """The largest sum of the bytes of the step's temporaries alive on one line."""
    temps = steps.temps
    lines = range(max(t[2] for t in temps) + 1)
    return max(sum(t[3].numel() * t[3].element_size() for t in temps if t[1] <= i <= t[2]) for i in lines)


def test_release_lets_the_buffer_and_every_view_go_unless_a_step_holds_it(device, monkeypatch):
    """What a CUDA graph capture does after its warm-up (cuda_graphs.py): the buffer and the replays' views into it
    go; the next replay allocates it again and computes the same step. Under autocast: the backward's batch of the
    gradients' casts back to fp32 reads arena views."""
    monkeypatch.setattr(arena, "_ARENAS", weakref.WeakValueDictionary())
    model = small_model(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    monkeypatch.setattr(model, "forward", _autocast(model.forward, torch.device(device).type))
    steps = _training_plan(model, x)
    a = steps.arena
    out = model(x)
    assert not a.release() and a.buffer is not None  # the step's forward holds it
    out.sum().backward()
    model.zero_grad(set_to_none=True)
    storage = a.buffer.untyped_storage()
    arena.release()
    assert a.buffer is None and not steps.fwd_views and not steps.bwd_views
    gc.collect()
    assert torch._C._storage_Use_Count(storage._cdata) == 1  # `storage` alone: no view of the buffer is left
    out = model(x)
    out.sum().backward()
    grads = _grads(model)
    assert a.buffer is not None and len(steps.fwd_views) > 10
    with monkeypatch.context() as m:
        m.setenv("FASTVIT_PLAN", "0")
        model(x).sum().backward()
    ref = _grads(model)
    assert all(torch.equal(grads[n], ref[n]) for n in grads)


def test_two_forwards_before_their_backwards(device, monkeypatch):
    """Gradient accumulation: the second forward finds the arena held by the first step and allocates afresh; the
    backwards, in either order, give the gradients the unplanned steps give."""
    model = small_model(device)
    x1, x2 = torch.randn(1, 3, 8, 8, device=device), torch.randn(1, 3, 8, 8, device=device)
    _training_plan(model, x1)
    model.zero_grad(set_to_none=True)

    def accumulate(first_first):
        losses = [model(x1).square().sum(), model(x2).sum()]
        for loss in losses if first_first else losses[::-1]:
            loss.backward()
        return _grads(model)

    for first_first in (True, False):
        grads = accumulate(first_first)
        with monkeypatch.context() as m:
            m.setenv("FASTVIT_PLAN", "0")
            ref = accumulate(first_first)
        assert grads.keys() == ref.keys()
        assert all(torch.equal(grads[n], ref[n]) for n in grads), first_first


def test_an_evaluation_between_a_forward_and_its_backward(device, monkeypatch):
    """An inference replay while a training step holds the arena allocates afresh; neither disturbs the other."""
    model = small_model(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    _training_plan(model, x)
    with torch.no_grad():
        for _ in range(3):
            model(x * 2)  # the inference plan (the model in train mode: a signature of its own)
    model.zero_grad(set_to_none=True)

    def step():
        out = model(x)
        with torch.no_grad():
            evaluated = model(x * 2)
        out.sum().backward()
        return out.detach(), evaluated, _grads(model)

    out, evaluated, grads = step()
    with monkeypatch.context() as m:
        m.setenv("FASTVIT_PLAN", "0")
        out_ref, eval_ref, grads_ref = step()
    assert torch.equal(out, out_ref) and torch.equal(evaluated, eval_ref)
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)


def test_a_step_takes_its_arrival_counters_from_the_zeroed_buffer(device, monkeypatch):
    """A training step whose weight gradients split their rows counts the splits' arrivals (ops/_common.py
    arrival_counters): its replay takes the counters from the arena's zeroed buffer, zero again after every step,
    instead of a zero-fill each, and its gradients are the unplanned step's. Counters left non-zero there would
    break the next step: the replay reads them."""
    monkeypatch.setattr(arena, "_ARENAS", weakref.WeakValueDictionary())
    for op in (gemm, fused_patch_embed):  # splits of 64 rows (BLOCK_K of every dW config): 85 token, 68 patch rows
        monkeypatch.setattr(op, "split_rows", lambda rows, tiles, device: (-(-rows // 64), 64))
    model = small_model(device, depth=1, heads=1)
    x = torch.randn(17, 3, 8, 8, device=device)
    steps = _training_plan(model, x)
    a = steps.arena
    # the block's four linear layers, the patch embedding, the column sums of the three LayerNorm backwards (norm1,
    # norm2, the final norm), of the dgelu GEMM's tiles (fc1's bias gradient) and of the attention backward's partial
    # rows (qkv's)
    assert sum(t.zeroed for t in steps.temps) == 10
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert not a.zeros.any()
    grads = _grads(model)
    with monkeypatch.context() as m:
        m.setenv("FASTVIT_PLAN", "0")
        model(x).sum().backward()
    ref = _grads(model)
    assert all(torch.equal(grads[n], ref[n]) for n in grads)
    a.zeros.fill_(1)  # what the replay reads: the splits never see their last arrival
    model(x).sum().backward()
    assert not all(torch.equal(g, ref[n]) for n, g in _grads(model).items())
