"""The one error rule every kernel test uses.

    err(ours, fp64 ref) <= 2 * err(torch in the same low precision, fp64 ref) + atol

with err the relative L2 error ||a - ref|| / ||ref||, the fp64 reference computed from the same (rounded) inputs and
cotangent as ours, plus a guard on the worst element (4x torch's worst + one ulp of the stored dtype, at least atol, of
the reference's scale) so a few wrong rows cannot hide in a large norm. NaN or inf never passes.

Also force_config, for the tests that run every tile a kernel's tuner may pick.
"""

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_matches(ours, lowp, ref, dtype, name="output"):
    assert ours is not None, f"{name}: no gradient computed"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: NaN or inf in our result"
    atol = ATOL[dtype]
    e_ours, e_torch = rel_err(ours, ref), rel_err(lowp, ref)
    assert e_ours <= 2 * e_torch + atol, (
        f"{name}: relative error {e_ours:.3e} > 2 * torch's {e_torch:.3e} + {atol:g} ({dtype})"
    )
    d_ours = (ours.double() - ref.double()).abs()
    worst, scale = d_ours.max().item(), ref.double().abs().max().item()
    # one unit in the last place of the stored dtype at the reference's largest magnitude is the granularity of any
    # result in that dtype: where torch happens to be exact (a saturated softmax row copies v), ours may sit one ulp off
    ulp = max(atol, torch.finfo(ours.dtype).eps if ours.is_floating_point() else 0.0)
    bound = 4 * (lowp.double() - ref.double()).abs().max().item() + ulp * max(scale, 1e-30)
    idx = tuple(int(i) for i in torch.unravel_index(d_ours.argmax(), d_ours.shape))
    assert worst <= bound, f"{name}: worst element error {worst:.3e} at {idx} > {bound:.3e} ({dtype})"


def check_op(op, ref, inputs, dtype, kwargs=None, grad_scale=1.0):
    """Run `op` on inputs in `dtype`, `ref` on the same inputs in `dtype` and in fp64; compare the output (each one,
    for an op returning a tuple) and the gradient of every input that requires grad (inputs: tensors or None;
    non-float args go through kwargs). Every output gets its own random cotangent."""
    kwargs = kwargs or {}

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    def run(fn, cast):
        xs = [None if t is None else cast(t).detach().requires_grad_(t.requires_grad) for t in inputs]
        outs = as_tuple(fn(*xs, **kwargs))
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grad_outs)])
        return outs, [None if (x is None or not x.requires_grad) else x.grad for x in xs]

    with torch.no_grad():
        probe = as_tuple(ref(*[None if t is None else t.double() for t in inputs], **kwargs))
    grad_outs = [
        (torch.randn(p.shape, dtype=torch.float64, device=p.device) * grad_scale).to(dtype).double() for p in probe
    ]
    # the fp64 reference sees the very inputs ours sees (rounded to dtype): measured is the error of the computation,
    # not the rounding of the inputs, which ill-conditioned cases (saturated softmax) amplify for every implementation
    out_ref, g_ref = run(ref, lambda t: t.to(dtype).double())
    out_low, g_low = run(ref, lambda t: t.to(dtype))
    out, g = run(op, lambda t: t.to(dtype))
    assert len(out) == len(out_ref), f"{len(out)} outputs, the reference has {len(out_ref)}"
    for i, (a, b, c) in enumerate(zip(out, out_low, out_ref)):
        assert a.dtype == b.dtype, f"output {i} is {a.dtype}; torch's is {b.dtype}"
        assert_matches(a, b, c, dtype, "output" if len(out) == 1 else f"output {i}")
    for i, (a, b, c) in enumerate(zip(g, g_low, g_ref)):
        if c is not None:
            assert_matches(a, b, c, dtype, f"grad of input {i}")
    return out[0] if len(out) == 1 else out


def force_config(monkeypatch, launcher, config):
    """Make a Launcher that does not tune (the interpreter, or FASTVIT_AUTOTUNE=0) launch `config`; skip the test
    where launches tune, since then the tuner picks."""
    import pytest

    from fastvit_kernels.tuning import tuning_on

    if tuning_on():
        pytest.skip("the configs are forced where launches take the first config (interpreter or FASTVIT_AUTOTUNE=0)")
    monkeypatch.setattr(launcher, "configs", [config])
    monkeypatch.setattr(launcher, "chosen", {})


def force_gemm_candidate(monkeypatch, name):
    """Run GEMM candidate `name` wherever a GEMM has it, else its family's first: FASTVIT_GEMM forces a family
    (triton or cublas); our second candidates ("triton+ln", ...) are picked only by a timing, made to win it here."""
    from fastvit_kernels import tuning

    family = tuning.backend_family(name)
    monkeypatch.setenv("FASTVIT_GEMM", family)
    if name != family:
        monkeypatch.setattr(tuning, "_choose_gemm_backend", lambda c, timed: (name if name in c else next(iter(c)), {}))


class TwiceLaunched:
    """A kernel launched twice on the same arguments, as Triton's autotuner launches it while it times the configs and
    then once more; keeps the arguments of the last launch."""

    def __init__(self, kernel):
        self.kernel, self.arg_names, self.args = kernel, kernel.arg_names, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args = args
            self.kernel[grid](*args, **kwargs)
            self.kernel[grid](*args, **kwargs)

        return launch


def gelu_grad_ref(pre):
    """GELU'(pre), exact GELU's derivative (erf form), in pre's dtype: float64 for the references."""
    return 0.5 * torch.erfc(-pre / 2**0.5) + pre * torch.exp(-0.5 * pre * pre) / (2 * torch.pi) ** 0.5


def linear_ref(a, w, b, epilogue, pre, res):
    """ops/gemm.py's linear with its epilogue, the same function in any dtype; w is nn.Linear's [N, K]."""
    y = a @ w.t()
    if b is not None:
        y = y + b
    if epilogue == "gelu":
        return torch.nn.functional.gelu(y)
    if epilogue == "gelu_grad":
        return y * gelu_grad_ref(pre)
    if epilogue == "residual":
        return res + y
    return y
