"""Inference plans (fastvit_kernels/plan.py): a replay computes what the model's forward computes, bit for bit, on
fresh inputs; every guard sends a changed model or input back to the forward; what cannot be replayed is not. The
recorder's code: tests/test_recording.py."""

import contextlib
import copy
import re

import pytest
import torch
import torch.nn as nn
from launches import record_launches
from plans import SMALL, calls, lines_calling, only_plan, plan_for, small_model, unplanned

from fastvit_kernels import plan, tuning
from fastvit_kernels.ops.cast import KeptCasts, cast_batch


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_replay_matches_the_forward_bit_for_bit_on_fresh_inputs(pool, device, monkeypatch):
    model = small_model(device, pool=pool)
    x = torch.randn(3, 3, 8, 8, device=device)
    _, p = calls(model, x, 2)  # the first call chooses, the second records
    assert isinstance(p, plan.Plan), p
    for _ in range(3):
        x = torch.randn(3, 3, 8, 8, device=device)
        with torch.no_grad():
            replayed = model(x)
        assert torch.equal(replayed, unplanned(model, x, monkeypatch))
    assert torch.isfinite(replayed).all()


def test_forward_features_has_plans_of_its_own(device, monkeypatch):
    model = small_model(device)
    for _ in range(4):
        x = torch.randn(3, 3, 8, 8, device=device)
        with torch.no_grad():
            feats, logits = model.forward_features(x), model(x)
        with monkeypatch.context() as m:
            m.setenv("FASTVIT_PLAN", "0")
            with torch.no_grad():
                assert torch.equal(feats, model.forward_features(x)) and torch.equal(logits, model(x))
    assert feats.shape == (3, 5, SMALL["dim"])
    assert sorted(s[-1] for s, p in plan.plans(model).items() if isinstance(p, plan.Plan)) == ["features", "logits"]


@pytest.mark.parametrize("no_grad", ["no_grad", "inference_mode"])
def test_replay_under_autocast_matches_the_forward(device, monkeypatch, no_grad):
    # under inference_mode autocast's casts reach the recorder as to(src, dtype), under no_grad as _to_copy
    model = small_model(device)
    kind = torch.device(device).type
    outs = []
    for _ in range(4):
        x = torch.randn(2, 3, 8, 8, device=device)
        with torch.autocast(kind, dtype=torch.bfloat16):
            with getattr(torch, no_grad)():
                replayed = model(x)
            with monkeypatch.context() as m:
                m.setenv("FASTVIT_PLAN", "0")
                with getattr(torch, no_grad)():
                    outs.append((replayed, model(x)))
        assert not torch.is_autocast_enabled(kind)  # the replay gives autocast back as it found it
    p = only_plan(model)
    for replayed, forward in outs:
        assert replayed.dtype == forward.dtype == torch.bfloat16
        assert torch.equal(replayed, forward)
    # autocast's casts of the model's weights run as one batch, into copies the plan keeps; at most one cast is left
    # in place, of an activation
    assert lines_calling(p, KeptCasts) == 1 and lines_calling(p, cast_batch) == 0
    casts = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
    assert sum(lines_calling(p, op._op) for op in casts) <= 1


def test_replay_inside_one_long_autocast_context(device, monkeypatch):
    """A serving loop inside one autocast context: autocast caches the head's cast weight across calls, and the plan
    still records and replays (the recording casts afresh)."""
    model = small_model(device)
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=torch.bfloat16), torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 3, 8, 8, device=device)
            out = model(x)
            with monkeypatch.context() as m:
                m.setenv("FASTVIT_PLAN", "0")
                assert torch.equal(out, model(x))
        assert torch.is_autocast_cache_enabled()
    assert isinstance(plan_for(model, x), plan.Plan)


def test_replay_launches_what_the_forward_launches(device, monkeypatch):
    launches = record_launches(monkeypatch, first_config_only=True)
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    per_call = []
    with torch.no_grad():
        for _ in range(4):
            launches.clear()
            model(x)
            per_call.append([(name, grid) for name, grid in launches])
    only_plan(model)
    assert per_call[0] == per_call[2] == per_call[3]  # the forward, then two replays
    assert len(per_call[0]) == 2 + 5 * SMALL["depth"]  # the patch embedding, the first norm1, five a block
    launched = 2 + 5 * SMALL["depth"]
    summary = r"infer: {} launches \(\d+ direct\), \d+ torch ops \((\d+) temporaries in the arena\)"
    kept = re.fullmatch(summary.format(launched), plan.summary(model))
    assert kept and int(kept[1]) == len(only_plan(model).fn.views) > 0, plan.summary(model)


def test_replay_deletes_each_intermediate_after_its_last_use(device):
    model = small_model(device)
    calls(model, torch.randn(2, 3, 8, 8, device=device), 2)
    source = only_plan(model).source
    made = re.findall(r"^\s+(?:\w+, )*(t\d+)(?:, \w+)* = ", source, flags=re.M)
    made = set(re.findall(r"\bt\d+\b", " ".join(re.findall(r"^\s+(.*?) = ", source, flags=re.M))))
    deleted = set(re.findall(r"\bt\d+\b", " ".join(re.findall(r"^\s+del (.*)$", source, flags=re.M))))
    (returned,) = re.findall(r"return (\w+)", source)
    assert made and made == deleted | {returned}


def test_different_batch_sizes_get_their_own_plans(device, monkeypatch):
    model = small_model(device)
    for batch in (1, 4, 1, 4, 1, 4):
        x = torch.randn(batch, 3, 8, 8, device=device)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (batch, SMALL["num_classes"])
    assert [type(p) for p in plan.plans(model).values()] == [plan.Plan, plan.Plan]
    assert torch.equal(out, unplanned(model, x, monkeypatch))


def test_a_step_whose_gpu_time_alone_counts_gets_plans_of_its_own(device):
    # its GEMMs are chosen by GPU time (tuning.gpu_time_only: cuda_graph_step's warm-up), a training step's outside it
    # with host time counted: a plan recorded in one context would replay the other's choices
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    for gpu_only in (False, True, False, True, False, True):
        with torch.no_grad(), tuning.gpu_time_only() if gpu_only else contextlib.nullcontext():
            model(x)
    assert [type(p) for p in plan.plans(model).values()] == [plan.Plan, plan.Plan]
    assert sorted(sig[-2] for sig in plan.plans(model)) == [False, True]


def test_another_shape_choosing_its_configurations_leaves_the_plan_alone(device):
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    _, p = calls(model, x, 3)
    decided = tuning.decisions()
    calls(model, torch.randn(5, 3, 8, 8, device=device), 1)  # new GEMM shapes: their configurations are chosen
    assert tuning.decisions() > decided
    with torch.no_grad():
        model(x)
    assert plan_for(model, x) is p


def test_plans_per_model_are_bounded(device, monkeypatch):
    monkeypatch.setattr(plan, "MAX_PLANS", 2)
    model = small_model(device)
    for batch in (1, 2, 3, 3, 3, 1):
        x = torch.randn(batch, 3, 8, 8, device=device)
        with torch.no_grad():
            assert torch.equal(model(x), unplanned(model, x, monkeypatch))
    assert sorted(s[0][0] for s in plan.plans(model)) == [1, 2]  # batch 3 came third: it runs the forward


def test_weights_changed_in_place_are_read_by_the_replay(device, monkeypatch):
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    before, _ = calls(model, x, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with torch.no_grad():
        after = model(x)
    only_plan(model)  # still the same plan: nothing it depends on changed
    assert not torch.equal(after, before[-1])
    assert torch.equal(after, unplanned(model, x, monkeypatch))


def test_weights_changed_through_data_are_read_by_a_replay_under_autocast(device, monkeypatch):
    """The replay keeps its cast copies of the weights from call to call and casts into them on every call: a change
    through .data (no new version for a cache to see) reaches the next output."""
    model = small_model(device)
    kind = torch.device(device).type
    x = torch.randn(2, 3, 8, 8, device=device)
    amp = lambda: torch.autocast(kind, dtype=torch.bfloat16)  # noqa: E731 - a context each: autocast's own cache
    with amp():  # of cast weights would hold the old values for the rest of one context
        before, _ = calls(model, x, 3)
    for p in model.parameters():
        p.data.mul_(1.5)
    with amp(), torch.no_grad():
        after = model(x)
    only_plan(model)
    assert not torch.equal(after, before[-1])
    with amp():
        assert torch.equal(after, unplanned(model, x, monkeypatch))


def _replayed_after(model, change, device, monkeypatch):
    """The model's outputs for a fresh input after change(model), once its plan has been made, the forward's, and
    the plan for the input after them."""
    x = torch.randn(2, 3, 8, 8, device=device)
    _, p = calls(model, x, 3)
    assert isinstance(p, plan.Plan)
    change(model)
    x = torch.randn(2, 3, 8, 8, device=device).to(model.cls_token.dtype)
    outs, p = calls(model, x, 3)  # the forward (a guard failed), a recording, a replay
    return outs, unplanned(model, x, monkeypatch), p


def _to_bf16(m):
    m.to(torch.bfloat16)


def _transpose_qkv_storage(m):
    w = m.blocks[0].attn.qkv.weight
    w.data = w.data.t().contiguous().t()  # the same values, column-major: other strides


def _new_head(m):
    m.head = nn.Linear(SMALL["dim"], SMALL["num_classes"]).to(m.cls_token.device)


def _forget_choices(m):
    tuning.forget()


def test_weights_moved_in_memory_keep_their_plan(device, monkeypatch):
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    _, p = calls(model, x, 3)
    for w in model.parameters():
        w.data = w.data.clone() * 2  # new memory, the same shapes, strides and dtypes
    with torch.no_grad():
        out = model(x)
    assert plan_for(model, x) is p
    assert torch.equal(out, unplanned(model, x, monkeypatch))


@pytest.mark.parametrize("change", [_to_bf16, _transpose_qkv_storage, _new_head, _forget_choices])
def test_a_changed_model_is_not_replayed_from_the_old_plan(change, device, monkeypatch):
    model = small_model(device)
    outs, forward, p = _replayed_after(model, change, device, monkeypatch)
    for out in outs:
        assert torch.equal(out, forward)
    assert isinstance(p, plan.Plan)  # and a new plan is made for it


def test_modules_built_elsewhere_leave_the_plan_alone(device, monkeypatch):
    """A loss module built every step (it registers a buffer) is not a change of the model."""
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    _, p = calls(model, x, 3)
    for _ in range(3):
        nn.CrossEntropyLoss()
        nn.Linear(3, 3)
        with torch.no_grad():
            model(x)
        assert plan_for(model, x) is p


def test_no_plan_when_switched_off(device, monkeypatch):
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    monkeypatch.setenv("FASTVIT_PLAN", "0")
    calls(model, x, 3)
    for _ in range(3):
        model(x).sum().backward()
    assert plan.plans(model) == {} and plan.summary(model) == "off (FASTVIT_PLAN=0)"


def test_a_forward_that_reads_a_result_is_not_replayed(device, monkeypatch):
    model = small_model(device)
    head = model.forward_head
    seen = []

    def forward_head(x):  # Python reads a value of the tensor: a replay would not
        seen.append(x.abs().max().item())
        return head(x)

    monkeypatch.setattr(model, "forward_head", forward_head)
    calls(model, torch.randn(2, 3, 8, 8, device=device), 4)
    (p,) = plan.plans(model).values()
    assert isinstance(p, plan.Unplannable) and "depends on the data" in p.reason
    assert plan.summary(model).startswith("not replayed: Unplannable(") and "depends on the data" in plan.summary(model)
    assert len(seen) == 4


def test_a_tensor_from_outside_the_model_is_not_replayed(device, monkeypatch):
    model = small_model(device)
    head = model.forward_head
    shift = torch.zeros(SMALL["num_classes"], device=device)

    def forward_head(x):
        return head(x) + shift

    monkeypatch.setattr(model, "forward_head", forward_head)
    x = torch.randn(2, 3, 8, 8, device=device)
    calls(model, x, 3)
    (p,) = plan.plans(model).values()
    assert isinstance(p, plan.Unplannable) and "outside the model" in p.reason
    shift += 1  # the forward still runs, and reads it
    with torch.no_grad():
        assert torch.equal(model(x), unplanned(model, x, monkeypatch))


@pytest.mark.parametrize("when", ["before", "after"])
def test_module_hooks_are_called_on_every_call(when, device, monkeypatch):
    """A forward hook on the head (to grab the pooled features, say) runs on every call: no plan is made while a
    module the forward calls has one, and one registered after a plan was made sends the calls back to the forward."""
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    seen = []

    def hook():
        model.head.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))

    if when == "before":
        hook()
    calls(model, x, 3)
    if when == "after":
        assert isinstance(plan_for(model, x), plan.Plan)
        hook()
    outs, p = calls(model, x, 3)
    assert len(seen) == (6 if when == "before" else 3)
    assert isinstance(p, plan.Unplannable) and "hooks" in p.reason
    assert torch.equal(outs[-1], unplanned(model, x, monkeypatch))


def test_a_copied_model_has_its_own_plans(device, monkeypatch):
    model = small_model(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    calls(model, x, 3)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.bias.add_(1.0)
    assert plan.plans(twin) == {}
    outs, _ = calls(twin, x, 3)
    assert torch.equal(outs[-1], unplanned(twin, x, monkeypatch))
    assert not torch.equal(outs[-1], calls(model, x, 1)[0][0])


def test_a_deleted_model_takes_its_plans_with_it(device):
    import gc

    model = small_model(device)
    calls(model, torch.randn(2, 3, 8, 8, device=device), 3)
    assert len(plan._PLANS) >= 1
    ref = __import__("weakref").ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert all(m is not None for m in plan._PLANS.keys())
