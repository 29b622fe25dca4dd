"""The recorder of step plans (fastvit_kernels/recording.py): the code it writes (dead lines left out, deletes after
the last use, aliases read as the original, allocations from templates, casts in batches) and what it leaves out."""

import re
import threading

import torch

from fastvit_kernels import cast_batches, recording, tuning
from fastvit_kernels.ops.cast import KeptCasts


def test_the_code_leaves_out_pure_lines_nothing_reads_and_keeps_the_rest():
    rec = recording.Recorder({})
    lines = [
        recording.Line("t0 = x + 1", ["x"], ["t0"], pure=True),  # read by the launch below: kept
        recording.Line("t1 = x * 2", ["x"], ["t1"], pure=True),  # read by nothing: left out
        recording.Line("t2 = x - 1", ["x"], ["t2"], pure=True),  # read only by t3, which nothing reads: left out
        recording.Line("t3 = t2 * 3", ["t2"], ["t3"], pure=True),
        recording.Line("out.append(t0)", ["t0"]),  # an effect: kept
        recording.Line("t4 = x + 4", ["x"], ["t4"], pure=True),  # returned: kept
    ]
    fn, source = rec.function(["x", "out"], lines, "t4", ["t4"])
    assert "t1" not in source and "t2" not in source and "t3" not in source
    out = []
    assert fn(10, out) == 14 and out == [11]
    assert "del t0" in source


def test_a_detached_tensor_is_read_as_the_original(device):
    rec = recording.Recorder({})
    x = torch.randn(4, device=device)
    rec.bind(x, "x")
    with recording.recording(rec):
        y = (x * 2).detach()
        z = y + 1
    fn, source = rec.function(["x"], rec.lines, rec.source(z), rec.take_reads())
    assert "detach" not in source and source.count(" = ") == 2
    x2 = torch.randn(4, device=device)
    assert torch.equal(fn(x2), x2 * 2 + 1)


def test_launches_from_another_thread_are_not_recorded():
    """While one thread records, another thread's launches run and stay out of its lines."""
    ran = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: ran.append((threading.get_ident(), grid))

    rec = recording.Recorder({})
    with recording.recording(rec):
        other = threading.Thread(target=tuning.launch_kernel, args=(Kernel(), (2,), (), {}))
        other.start()
        other.join()
        tuning.launch_kernel(Kernel(), (3,), (), {})
    assert [grid for _, grid in ran] == [(2,), (3,)]
    assert ran[0][0] != ran[1][0] == threading.get_ident()
    assert [line.text.split("[")[1] for line in rec.lines] == ["(3,)]()"]


def test_allocations_replay_from_templates_only_where_they_make_the_same_tensor(device):
    """A fresh contiguous allocation replays as empty_like of a template (cheaper than torch.empty with its keywords),
    one element at most (a one-element allocation's is that element: arrival counters of one strip); one with other
    strides (channels_last, empty_strided, a transposed empty_like, a zero-size one: empty_like keeps its strides) or
    in pinned memory replays as recorded."""
    rec = recording.Recorder({})
    x = torch.randn(2, 3, device=device)
    rec.bind(x, "x")
    with recording.recording(rec):
        plain = [
            torch.empty((2, 5), dtype=torch.bfloat16, device=device),
            torch.empty_like(x),
            x.new_empty((7,), dtype=torch.int32),
            torch.empty((1, 3, 1, 4), device=device),
            torch.empty((1,), dtype=torch.int32, device=device),
            torch.empty((1, 1), device=device),
        ]
        other = [
            torch.empty((2, 3, 4, 5), device=device, memory_format=torch.channels_last),
            torch.empty_like(x.t()),
            torch.empty_strided((3, 2), (1, 3), device=device),
            torch.empty((2, 0, 5), device=device),
        ]
    made = plain + other
    fn, source = rec.function(["x"], rec.lines, rec.source(tuple(made)), rec.take_reads())
    calls = dict(line.strip().split(" = ") for line in source.splitlines()[1:-1] if " = " in line)
    for i, t in enumerate(made):
        callee, arg = calls[rec.source(t)].rstrip(")").split("(", 1)
        from_template = rec.consts[callee] is torch.empty_like and arg in rec.consts
        assert from_template == (i < len(plain)), calls[rec.source(t)]
        if from_template:
            template = rec.consts[arg]
            assert template.shape == t.shape and template.untyped_storage().nbytes() <= t.element_size()
    for a, b in zip(fn(x), made):
        assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def _recorded_casts(device, weights, body):
    """(recorder, x, what body returned) with body(x, weights) run under a recorder that knows `weights` as the
    model's tensors."""
    rec = recording.Recorder({id(w): w for w in weights})
    x = torch.randn(4, 8, device=device)
    rec.bind(x, "x")
    with recording.recording(rec):
        out = body(x, weights)
    return rec, x, out


def _casts_left(source) -> int:
    return sum(" = " in line and "dtype=" in line for line in source.splitlines())


def _kept_batches(source) -> list:
    """The lines that cast a batch of the model's tensors into kept copies: `t0, t1, = c7(p0, p1)`."""
    return [line.split(" = ")[-1] for line in source.splitlines() if re.search(r", = c\d+\((p\d+(, )?)+\)$", line)]


def test_casts_of_the_models_tensors_run_as_one_batch_where_the_first_ran(device):
    """Autocast's casts of the weights: one batch (a launch for several on a GPU instead of one each), at the first
    cast, into copies kept from call to call (no allocation a weight); the same values, bit for bit, also after the
    weights change in place without a new version (.data.mul_), which the kept copies follow."""
    weights = [torch.randn(8, 8, device=device) for _ in range(3)]

    def body(x, w):
        h = (x + 1).to(torch.bfloat16)  # an activation's cast: stays where it is
        for wi in w:
            h = h @ wi.to(torch.bfloat16).t()
        return h

    rec, x, out = _recorded_casts(device, weights, body)
    fn, source = rec.function(["x"], rec.lines, rec.source(out), rec.take_reads())
    assert [b[b.index("(") :] for b in _kept_batches(source)] == ["(p0, p1, p2)"] and _casts_left(source) == 1
    kept = next(v for v in fn.__globals__.values() if isinstance(v, KeptCasts))
    for step in range(3):
        x2 = torch.randn(4, 8, device=device)
        assert torch.equal(fn(x2), body(x2, weights))
        if step == 0:
            copies = list(kept.outs)
        assert all(a is b for a, b in zip(kept.outs, copies))  # the same tensors: no allocation after the first call
        for w in weights:
            w.data.mul_(1.5)  # .data: no new version, the same tensor object


def test_a_cast_after_an_in_place_write_to_its_weight_stays_after_it(device):
    """An in-place op on a weight between two casts: the op's output names the weight from then on, so the later
    cast reads that name and is not moved before the write; the casts before it still run as one batch."""
    weights = [torch.randn(8, 8, device=device) for _ in range(3)]

    def body(x, w):
        a = w[0].to(torch.bfloat16)
        w[2].add_(1.0)  # its cast below must see what this line wrote
        b = w[1].to(torch.bfloat16)
        c = w[2].to(torch.bfloat16)
        return a.float() + b.float() + c.float() + x.sum()

    rec, x, out = _recorded_casts(device, weights, body)
    fn, source = rec.function(["x"], rec.lines, rec.source(out), rec.take_reads())
    assert [b.count("p") for b in _kept_batches(source)] == [2]  # w[0] and w[1] in a batch
    assert _casts_left(source) == 1 + 3  # w[2]'s, after the add, and the three .float() (read by the sums)
    mine = [w.clone() for w in weights]
    expected = body(x, mine)
    assert torch.equal(fn(x), expected)
    assert all(torch.equal(a, b) for a, b in zip(weights, mine))


def test_a_cast_of_an_input_written_in_place_before_it_stays_after_the_write(device):
    """An input written in place keeps its name (an in-place op hands back its input): the line with effects that
    reads it ends the batch before its later cast, which starts one of its own after the write."""
    weights = [torch.randn(8, 8, device=device) for _ in range(2)]

    def body(x, w):
        a = w[0].to(torch.bfloat16)
        x.add_(1.0)
        b = x.to(torch.bfloat16)
        c = w[1].to(torch.bfloat16)
        return a.float().sum() + b.float().sum() + c.float().sum()

    rec, x, out = _recorded_casts(device, weights, body)
    fn, source = rec.function(["x"], rec.lines, rec.source(out), rec.take_reads())
    lines = source.splitlines()
    add = next(i for i, line in enumerate(lines) if line.strip().startswith("_ = "))  # x.add_: hands back x
    batch = next(i for i, line in enumerate(lines) if ",), (" in line)
    assert batch > add and "(x, p" in lines[batch]  # x's cast after the write, in a batch with w[1]'s
    x2 = torch.randn(4, 8, device=device)
    expected = body(x2.clone(), weights)
    assert torch.equal(fn(x2), expected)


def test_casts_only_the_return_reads_run_as_one_batch_at_the_end(device):
    """The gradients' casts back to the weights' dtype (read by the return only): one batch at the end; a cast whose
    input a later line reads, or whose output a line reads, stays in place."""
    weights = [torch.randn(8, 8, device=device) for _ in range(1)]

    def body(x, w):
        g1 = (x * 2).to(torch.bfloat16)
        g2 = (x * 3).to(torch.bfloat16)
        r1, r2 = g1.to(torch.float32), g2.to(torch.float32)  # only returned: batched at the end
        h = (x * 4).to(torch.bfloat16)
        r3 = h.to(torch.float32)  # its input is read below: stays
        r4 = (h + 1).to(torch.float32)
        r5 = r4.to(torch.bfloat16)  # r4 is read by this line: r4's cast stays
        return r1, r2, r3, r5

    rec, x, out = _recorded_casts(device, weights, body)
    fn, source = rec.function(["x"], rec.lines, rec.source(out), rec.take_reads())
    body_lines = [line for line in source.splitlines()[1:-1] if not line.strip().startswith("del ")]
    # last: r1's and r2's casts (bf16 to fp32) in one batch, r5's (fp32 to bf16, its input r4 read by nothing after)
    # in another; in place: the three activations' casts to bf16, r3's (h is read below), r4's (read by r5's cast)
    assert all(",), (" in line for line in body_lines[-2:]) and not any(",), (" in line for line in body_lines[:-2])
    assert _casts_left(source) == 3 + 2
    for a, b in zip(fn(x), body(x, weights)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_batches_hold_at_most_cast_batch_bytes(device, monkeypatch):
    """CAST_BATCH_BYTES bounds what a batch makes early (or keeps late): five weights' casts at two a batch make
    batches of two, two and one (left in place); a late batch runs where its last cast ran."""
    weights = [torch.randn(8, 8, device=device) for _ in range(5)]
    monkeypatch.setattr(cast_batches, "CAST_BATCH_BYTES", 2 * 8 * 8 * 2)  # two bf16 8x8 casts

    def body(x, w):
        h = x
        for wi in w:
            h = h @ wi.to(torch.bfloat16).float().t()
        g = [(h * k).to(torch.bfloat16) for k in range(4)]
        return h, *[gi.to(torch.float32) for gi in g]  # read by the return only: late casts, 128 B each

    rec, x, out = _recorded_casts(device, weights, body)
    fn, source = rec.function(["x"], rec.lines, rec.source(out), rec.take_reads())
    early = [b[b.index("(") :] for b in _kept_batches(source)]
    assert early == ["(p0, p1)", "(p2, p3)"]
    assert sum("(p4, dtype=" in line for line in source.splitlines()) == 1  # w4 alone: in place
    late = [line for line in source.splitlines() if ",), (" in line]
    assert len(late) == 2  # four 4x8 fp32 outputs (128 B each), two a batch
    x2 = torch.randn(4, 8, device=device)
    for a, b in zip(fn(x2), body(x2, weights)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_view_that_its_schema_does_not_declare_is_recorded_as_one(device):
    """aten._unsafe_view returns a view whose schema declares none: a line's outputs count as views of its inputs by
    the storage they share (arena.py must not put a tensor under a returned view of it in the arena)."""
    rec = recording.Recorder({})
    with recording.recording(rec):
        a = torch.empty(4, 6, device=device)
        b = torch.ops.aten._unsafe_view(a, [6, 4])
        c = a.sum(0)
    by_text = {line.makes[0]: line.views for line in rec.lines if line.makes}
    assert by_text == {rec.source(a): False, rec.source(b): True, rec.source(c): False}
