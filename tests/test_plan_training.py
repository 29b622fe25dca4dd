"""Training plans (fastvit_kernels/plan.py): a replayed step's output and every gradient are the unplanned step's,
bit for bit; what a training step may do between calls (optimizer steps, freezing, hooks, a second backward) is
replayed, or refused, as autograd would."""

import re

import pytest
import torch
from launches import record_launches
from plans import lines_calling, plan_for, small_model

from fastvit_kernels import plan
from fastvit_kernels.ops.cast import KeptCasts, cast_batch


def _train_step(model, x, planned=True, monkeypatch=None, seed=0):
    """(output, {name: gradient}) of one step: zero_grad, forward, a loss, backward."""
    ctx = monkeypatch.context() if monkeypatch is not None else _nothing()
    with ctx as m:
        if not planned:
            m.setenv("FASTVIT_PLAN", "0")
        model.zero_grad(set_to_none=True)
        if x.grad is not None:
            x.grad = None
        torch.manual_seed(seed)  # the same dropout masks for both paths
        out = model(x)
        (out.float().square().sum() + out.float().sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if x.grad is not None:
        grads["input"] = x.grad
    return out.detach(), grads


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_same_step(model, x, monkeypatch, seed=0):
    out, grads = _train_step(model, x, seed=seed)
    ref, ref_grads = _train_step(model, x, planned=False, monkeypatch=monkeypatch, seed=seed)
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
        assert torch.isfinite(grads[name]).all(), name


@pytest.mark.parametrize("input_grad", [False, True])
def test_training_replay_matches_the_step_in_output_and_every_gradient(input_grad, device, monkeypatch):
    model = small_model(device).train()
    for step in range(4):
        x = torch.randn(3, 3, 8, 8, device=device, requires_grad=input_grad)
        _assert_same_step(model, x, monkeypatch, seed=step)
    assert isinstance(plan_for(model, x), plan.TrainingPlan)


def test_training_replay_under_autocast_with_embedding_dropout(device, monkeypatch):
    model = small_model(device, emb_dropout=0.25).train()
    kind = torch.device(device).type
    for step in range(4):
        x = torch.randn(2, 3, 8, 8, device=device)
        with torch.autocast(kind, dtype=torch.bfloat16):
            _assert_same_step(model, x, monkeypatch, seed=step)
    p = plan_for(model, x)
    assert isinstance(p, plan.TrainingPlan)
    # the weights' casts in the forward (into copies the plan keeps), their gradients' casts back to fp32 in the
    # backward: a batch each
    assert lines_calling(p, KeptCasts) == 1 and lines_calling(p, cast_batch) == 1


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "autocast"])
def test_training_replay_reads_the_weights_an_optimizer_updates(amp, device, monkeypatch):
    """Five SGD steps replayed and five run as usual, from the same weights: the same weights after them. Under
    autocast the replay casts the updated weights into the copies it keeps from the step before."""
    weights = {}
    kind = torch.device(device).type
    for planned in (True, False):
        torch.manual_seed(0)
        model = small_model(device, depth=1).train()  # one block: the replays' updated weights are any block's
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(5):
            torch.manual_seed(100 + step)
            x = torch.randn(2, 3, 8, 8, device=device)
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=amp):
                _train_step(model, x, planned=planned, monkeypatch=monkeypatch)
            opt.step()
        weights[planned] = [p.detach().clone() for p in model.parameters()]
        assert isinstance(plan_for(model, x), plan.TrainingPlan) == planned
    for a, b in zip(weights[True], weights[False]):
        assert torch.equal(a, b)


def test_freezing_or_unfreezing_parameters_records_the_step_again(device, monkeypatch):
    model = small_model(device, depth=1).train()  # the patch embedding frozen: one block behind it is enough
    x = torch.randn(2, 3, 8, 8, device=device)
    plans_seen = []
    for requires in (True, False, True):  # fine-tuning without the patch embedding, then with it again
        model.patch_embed.requires_grad_(requires)
        for _ in range(3):
            _assert_same_step(model, x, monkeypatch)
        assert (model.patch_embed.proj.weight.grad is not None) == requires
        plans_seen.append(plan_for(model, x))
    assert all(isinstance(p, plan.TrainingPlan) for p in plans_seen)
    assert len({id(p) for p in plans_seen}) == 3


def test_a_replayed_step_runs_one_backward_and_says_so(device, monkeypatch):
    model = small_model(device).train()
    x = torch.randn(2, 3, 8, 8, device=device)
    for _ in range(3):
        _train_step(model, x)
    out = model(x).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs its backward once.*FASTVIT_PLAN=0"):
        out.backward()
    monkeypatch.setenv("FASTVIT_PLAN", "0")
    out = model(x).sum()
    out.backward(retain_graph=True)
    out.backward()


def test_a_weight_changed_between_forward_and_backward_is_refused_as_autograd_refuses_it(device, monkeypatch):
    model = small_model(device).train()
    x = torch.randn(2, 3, 8, 8, device=device)
    for planned in (False, True):
        monkeypatch.setenv("FASTVIT_PLAN", "1" if planned else "0")
        for _ in range(3):
            _train_step(model, x)
        loss = model(x).sum()
        with torch.no_grad():
            model.blocks[0].mlp.fc1.weight.mul_(2)  # an optimizer step before the backward: a bug
        with pytest.raises(
            RuntimeError, match="modified by an inplace operation|modified by an in-place operation"
        ) as e:
            loss.backward()
    p = plan_for(model, x)
    assert isinstance(p, plan.TrainingPlan)
    # the refused step let the arena go, though its traceback (and the frames in it) lives on
    assert e.tb is not None and not p.fn.__self__.arena.lock.locked()


def test_no_training_plan_with_checkpointing_or_gradient_hooks(device, monkeypatch):
    model = small_model(device, depth=1).train()
    x = torch.randn(2, 3, 8, 8, device=device)
    model.set_grad_checkpointing(True)
    for _ in range(3):
        _train_step(model, x)
    assert plan.plans(model) == {}
    model.set_grad_checkpointing(False)
    fired = []
    model.head.weight.register_hook(lambda g: fired.append(1))
    for _ in range(3):
        _assert_same_step(model, x, monkeypatch)
    assert isinstance(plan_for(model, x), plan.Unplannable)
    assert len(fired) == 6  # once a backward


def test_training_replay_launches_what_the_step_launches(device, monkeypatch):
    launches = record_launches(monkeypatch, first_config_only=True)
    model = small_model(device).train()
    x = torch.randn(2, 3, 8, 8, device=device)
    per_step = []
    for _ in range(4):
        launches.clear()
        _train_step(model, x)
        per_step.append([(name, grid) for name, grid in launches])
    assert isinstance(plan_for(model, x), plan.TrainingPlan)
    assert per_step[0] == per_step[2] == per_step[3]
    line = r"train: (\d+) launches \((\d+) direct\), (\d+) torch ops \((\d+) temporaries in the arena\)"
    summary = re.fullmatch(line, plan.summary(model))
    assert summary and int(summary[1]) == len(per_step[0]), plan.summary(model)  # the forward's and the backward's
    source = plan_for(model, x).source
    assert "saved.clear()" in source  # the backward lets each activation go after its last use


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CIFAR-10 model at batch 64 is a GPU's work")
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_cifar10_steps_replayed_on_the_gpu_match_the_unplanned_steps(mode, monkeypatch):
    """vit_cifar10 under bf16 autocast with an AdamW step after each backward, as benchmarks/test_e2e.py runs it: the
    backward on autograd's device thread, TMA launches, the GEMM chooser's decisions made in the first step, the
    replays' direct launches."""
    from fastvit_kernels import vit_cifar10

    results = {}
    for planned in (True, False):
        monkeypatch.setenv("FASTVIT_PLAN", "1" if planned else "0")
        torch.manual_seed(0)
        model = vit_cifar10().cuda().train(mode == "train")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        outs = []
        for step in range(4):
            torch.manual_seed(10 + step)
            x = torch.randn(64, 3, 32, 32, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if mode == "infer":
                    with torch.no_grad():
                        outs.append(model(x).float())
                    continue
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out.float(), torch.arange(64, device="cuda") % 10)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            outs.append(out.detach().float())
        results[planned] = (outs, [p.detach().clone() for p in model.parameters()])
        x_sig = plan_for(model, x)
        assert isinstance(x_sig, plan.TrainingPlan if mode == "train" else plan.Plan) == planned
        if planned:  # every launch calls the compiled kernel's launcher (direct_launch), none goes through Triton's
            assert x_sig.direct and not re.search(r"c\d+\[\(", x_sig.source), x_sig.source
    for a, b in zip(results[True][0], results[False][0]):
        assert torch.equal(a, b)
    for a, b in zip(results[True][1], results[False][1]):
        assert torch.equal(a, b)
