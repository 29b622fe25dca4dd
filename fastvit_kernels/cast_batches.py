"""The casts of a step plan's lines in batches (recording.Recorder.function): autocast's casts of the weights, one
torch._foreach_copy_ for many (ops/cast.py), and where they are the model's own tensors, into outputs the replay
keeps from call to call (KeptCasts)."""

from .lines import Line
from .ops.cast import KeptCasts, cast_batch


def batch_casts(lines: list, returned: set, const) -> list:
    """lines with their casts in batches, one ops.cast.cast_batch call each (one foreach copy where each cast is a
    torch operation of its own: ~100 casts of weights in an autocast forward, ~100 of their gradients in the
    backward). Two kinds move, the values they compute unchanged:
    - casts of the model's tensors and the function's inputs (names no line makes) run together where the first of a
      batch ran; a line with effects that reads the input of a later one ends the batch before it (an input written
      in place keeps its name; a weight written in place is named by that line from then on, so its later casts read
      a name a line makes and do not move);
    - casts whose output only the function's return reads, and whose input no later line reads, run together where
      the last of a batch ran (the gradients' casts to the weights' dtype).
    A batch holds at most CAST_BATCH_BYTES of outputs: what it makes early (or keeps late) lives that much longer.
    An early batch of the model's tensors alone casts into outputs the replay keeps from call to call (KeptCasts: no
    allocation a cast); `const` names an object for the code (Recorder._const).
    """
    made = {n for line in lines for n in line.makes}
    readers = {}
    for i, line in enumerate(lines):
        for n in line.reads:
            readers.setdefault(n, []).append(i)
    early, late = [[]], [[]]
    for i, line in enumerate(lines):
        cast = line.cast
        if cast is None:
            continue
        if cast.src not in made:
            batch = early[-1]
            if batch and any(not other.pure and cast.src in other.reads for other in lines[batch[0] + 1 : i]):
                early.append(batch := [])
            _add(early, batch, i, lines)
        elif line.makes[0] in returned and i == readers[cast.src][-1] and line.makes[0] not in readers:
            _add(late, late[-1], i, lines)
    at = {ids[0]: ids for ids in early if len(ids) > 1} | {ids[-1]: ids for ids in late if len(ids) > 1}
    if not at:
        return lines
    moved = {i for ids in at.values() for i in ids}
    kept = {ids[0] for ids in early if len(ids) > 1 and not any(lines[j].cast.read for j in ids)}
    out = []
    for i, line in enumerate(lines):
        if i not in moved:
            out.append(line)
        if i in kept:  # an early batch of the model's tensors: cast into the outputs of the call before
            out.append(_kept_batch(lines, at[i], const))
        elif i in at:  # an early batch's first line or a late batch's last: the batch instead
            out += _batch(lines, at[i], const)
    return out


# The bytes of cast outputs one batch holds: the casts it runs early (or keeps late) live that much longer than
# unbatched. 16 MiB: a ViT-S's ~100 weight casts (42 MB in bf16) in 3 batches, a ViT-B's (172 MB) in 11.
CAST_BATCH_BYTES = 16 << 20


def _add(batches: list, batch: list, i: int, lines: list):
    """lines[i]'s cast into `batch`, the last of `batches`, or into a new one where it would pass CAST_BATCH_BYTES."""
    if batch and sum(lines[j].cast.nbytes for j in batch) + lines[i].cast.nbytes > CAST_BATCH_BYTES:
        batches.append(batch := [])
    batch.append(i)


def _batch(lines: list, ids: list, const) -> list:
    """The lines that do the casts of lines[ids]: their outputs' allocations, then one cast_batch per dtype pair."""
    out, groups = [], {}
    for i in ids:
        line = lines[i]
        out.append(Line(f"{line.makes[0]} = {line.cast.alloc}", [], line.makes, pure=True, alloc=line.cast.template))
        groups.setdefault(line.cast.key, []).append((line.makes[0], line.cast))
    for pairs in groups.values():
        dsts, srcs = [d for d, _ in pairs], [c.src for _, c in pairs]
        reads = dsts + [c.src for _, c in pairs if c.read]
        copy = const(cast_batch)
        out.append(Line(f"{copy}(({', '.join(dsts)},), ({', '.join(srcs)},))", reads))
    return out


def _kept_batch(lines: list, ids: list, const) -> Line:
    """The line that does the casts of lines[ids], all of the model's tensors, into outputs kept between calls."""
    casts = [lines[i].cast for i in ids]
    dsts = [lines[i].makes[0] for i in ids]
    kept = const(KeptCasts([c.template for c in casts], [c.key for c in casts]))
    return Line(f"{', '.join(dsts)}, = {kept}({', '.join(c.src for c in casts)})", [], dsts)
