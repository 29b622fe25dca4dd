"""Triton's CPU interpreter, made to compute what the GPU computes: applied at import, only when interpreting.

Every kernel test of this project runs under the interpreter on machines without a GPU, so its arithmetic must be
the GPU's. Five defects, all seen with triton 3.6 and 3.8 (tests/test_interpreter.py checks each fix against torch):

- tl.dot with bf16 operands: the interpreter keeps bf16 as uint16 bit patterns and create_dot multiplied those
  integers (a 16x16 bf16 dot came out near 1e10). bf16 operands are widened to fp32 first: bf16 products are exact
  in fp32, which is what the tensor cores compute too.
- fp32 -> bf16 casts (explicit .to and the implicit one of a store) truncated the mantissa, where the GPU rounds to
  nearest even (cvt.rn.bf16.f32). Truncation doubled our bf16 errors and biased them, which made the error rule's
  comparison against torch's bf16 a coin toss on small tests. They round to nearest even, as torch does.
- integer (and bool) -> bf16 casts kept the integer's bits: True became 9.2e-41, not 1. They go through fp32.
- tl.dot summed its fp32 products in the order numpy's BLAS picks for the tile's shape, so one score q.k came out
  differently in a forward tile of 64 keys and a backward tile of 32 (a few ulps at logits in the thousands). The
  GPU sums a dot's K in a fixed order whatever the tile; kernels that recompute a value in another tile (the
  attention backward's softmax) rely on it, and a saturated softmax turns those ulps into a gradient error many
  times eager's (tests: large logits). Dots with an fp32 accumulator sum in fp64 and round once: the same value for
  every tile shape.
- tl.fma rounded the product before adding (x * y + z in fp32), where the GPU's fma.rn rounds once. The difference
  decides a saturated softmax: with fma(qk, c, -m c) as the exponent, unfused the row max's exponent came out exactly
  0 and fused it is m c's rounding error, which left P one ulp off one-hot on the GPU and its gradient far from eager's
  (kernels/attention.py now subtracts first; tests: saturated rows). fp32 fma computes in fp64 (the product exact)
  and rounds once.
"""

import os


def _read_interpret_knob() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, at import: Triton chose interpreter or compiler when our kernels were decorated (also at import), from
# the same knob, so this matches the kernels defined in this process, and torch.compile can trace a plain constant.
_INTERPRETING = _read_interpret_knob()


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return _INTERPRETING


def _round_to_bf16(interpreter, data):
    """fp32 values -> a bf16 TensorHandle, rounded to nearest even (NaN stays a quiet NaN)."""
    import numpy as np
    import triton.language as tl

    bits = np.ascontiguousarray(data, dtype=np.float32).reshape(-1).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)  # ties to even
    nan = np.isnan(bits.view(np.float32))
    rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return interpreter.TensorHandle(rounded.reshape(np.shape(data)), tl.bfloat16)


def _patch() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_fastvit", False):
        return
    original_dot, original_cast, original_fma = builder.create_dot, builder.cast_impl, builder.create_fma

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        a, b = widen(a), widen(b)
        float_operands = a.dtype.scalar in (tl.float32, tl.float16) and b.dtype.scalar in (tl.float32, tl.float16)
        if d.dtype.scalar != tl.float32 or not float_operands:
            return original_dot(self, a, b, d, *args, **kwargs)
        dot = np.matmul(np.asarray(a.data, np.float64), np.asarray(b.data, np.float64)).astype(np.float32)
        return interpreter.TensorHandle(dot + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar != tl.bfloat16 or not (src.dtype.scalar == tl.float32 or src.dtype.scalar.is_int()):
            return original_cast(self, src, dst_type)
        return _round_to_bf16(interpreter, np.asarray(src.data, dtype=np.float32))

    def create_fma(self, x, y, z):
        if z.dtype.scalar != tl.float32:
            return original_fma(self, x, y, z)
        wide = [np.asarray(h.data, np.float64) for h in (x, y, z)]
        return interpreter.TensorHandle((wide[0] * wide[1] + wide[2]).astype(np.float32), z.dtype.scalar)

    create_dot._fastvit = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fma = create_fma


if interpreting():
    _patch()
