"""What a compiled GEMM spends its instructions on, read from its SASS without a GPU: the offline performance report.

Per kernel configuration: instructions per K step (the innermost loop that issues the matrix instructions), of which
matrix instructions; instructions per tile after that loop (pipeline drain, epilogue, stores); the wgmma wait depth
in the loop (0: every wgmma waits for the previous one to finish); how operands load (TMA, cp.async); blocks that fit
on one SM; and ptxas's performance warnings (C7515: wgmma serialised). Counts are per warp, in SASS instructions.
"""

import hashlib
import json
import os
import re
import subprocess
import tempfile

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
SM90_SMEM_PER_SM = 233472  # 228 KB; each block also reserves 1 KB
SM90_REGS = 65536


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _sass(cubin: bytes) -> list:
    """[(address, instruction)] of the cubin's only kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.search, text.splitlines()) if m]


def ptxas_warnings(ptx: str, cap: int) -> list:
    """ptxas's performance notes for this PTX (C7515 and the like), from the ptxas inside Triton's wheel. Kept beside
    Triton's cache, keyed by the PTX, the target and that ptxas: Triton's cache spares the compile check its compiles,
    not this second ptxas run (~220 of them, ~80 s of a 2-core box's CPU a check)."""
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    ptxas = _tool("ptxas")
    stat = os.stat(ptxas)
    key = hashlib.sha256(f"{ptxas} {stat.st_size} {stat.st_mtime_ns} {arch}\n{ptx}".encode()).hexdigest()
    from triton import knobs

    kept = os.path.join(knobs.cache.dir, "fastvit-ptxas-notes", f"{key}.json")
    try:
        with open(kept) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True
        )
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    notes = [line.strip() for line in (out.stdout + out.stderr).splitlines() if "C75" in line or "Loss" in line]
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(kept), delete=False, suffix=".tmp") as f:
        json.dump(notes, f)
    os.replace(f.name, kept)  # whole or not at all, whichever process of the pool writes it
    return notes


def _count(sass, lo, hi):
    return sum(1 for a, _ in sass if lo <= a <= hi)


def _loads(body, sass) -> str:
    """How the K loop gets its operands: TMA or cp.async in the loop itself, or TMA in another warp's loop (a
    warp-specialised kernel, whose MMA loop only waits on barriers)."""
    if any("UTMALDG" in ins for ins in body):
        return "tma"
    if any("LDGSTS" in ins for ins in body):
        return "cp.async"
    return "tma, load warps" if any("UTMALDG" in ins for _, ins in sass) else "ld"


def _loops(sass) -> tuple:
    """(every loop's (start, end): its backward branches; the K loop's, the innermost with an MMA, or None)."""
    loops = []
    for addr, ins in sass:
        m = _BRA.search(ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    mma = [a for a, ins in sass if "GMMA" in ins or "HMMA" in ins]
    k_loops = [(s, e) for s, e in loops if any(s <= a <= e for a in mma)]
    return loops, min(k_loops, key=lambda se: se[1] - se[0]) if k_loops else None


def local_memory_in_k_loop(cubin: bytes) -> int:
    """How many local-memory loads and stores (spills: LDL, STL) the K loop issues a step; 0 without a K loop."""
    sass = _sass(cubin)
    k_loop = _loops(sass)[1]
    if k_loop is None:
        return 0
    return sum(1 for a, ins in sass if k_loop[0] <= a <= k_loop[1] and re.search(r"\b(LDL|STL)\b", ins))


def analyse(cubin: bytes, ptx: str, cap: int, warps: int, shared: int, regs: int) -> dict:
    sass = _sass(cubin)
    loops, k_loop = _loops(sass)
    res = dict(k_step=None, k_step_mma=None, tile_rest=None, wgmma_wait=None, loads=None)
    if k_loop is not None:
        start, end = k_loop
        body = [ins for a, ins in sass if start <= a <= end]
        outer = [e for s, e in loops if s < start and e > end]  # a persistent kernel's loop over tiles
        exits = [a for a, ins in sass if "EXIT" in ins and a > end]
        stop = min(outer) if outer else (max(exits) if exits else sass[-1][0])
        waits = [int(w, 16) for w in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", "\n".join(body))]
        res.update(
            k_step=len(body),
            k_step_mma=sum(1 for ins in body if "GMMA" in ins or "HMMA" in ins),
            tile_rest=_count(sass, end + 1, stop),
            wgmma_wait=min(waits) if waits else None,
            loads=_loads(body, sass),
        )
    threads = 32 * warps
    per_block_regs = -(-regs // 8) * 8 * threads if regs else 0
    res["blocks_per_sm"] = min(
        SM90_REGS // per_block_regs if per_block_regs else 32,
        SM90_SMEM_PER_SM // (shared + 1024),
        64 // warps,
    )
    has_mma = any("GMMA" in ins or "HMMA" in ins for _, ins in sass)
    res["ptxas_warnings"] = ptxas_warnings(ptx, cap) if has_mma and cap == 90 else []
    return res


def report(results: list) -> str:
    """A markdown table of the GEMM configurations of a compile_kernels run."""
    lines = [
        "| kernel | operands | epilogue / shape | tile | warps | stages | loads | K-step instr (mma) | rest of tile | "
        "wgmma wait | regs | smem KB | blocks/SM | C7515 |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if not r.get("ok") or r.get("k_step") is None:
            continue
        c, p = r["consts"], r["ptrs"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        if "EPILOGUE" in c:
            epi = c["EPILOGUE"] + ("+pre" if c.get("STORE_PRE") else "")
        elif "SPLIT" in c:
            epi = "split rows, partials summed in the kernel" if c["SPLIT"] else "one split"
        elif "N_CHUNKS" in c:
            epi = f"residual+LayerNorm, {c['N_CHUNKS']} x {c['BLOCK_N']} columns"
        else:
            epi = f"head dim {c['HEAD_DIM']}" if "HEAD_DIM" in c else "-"
            epi += ", a whole (batch, head) pair per tile" if c.get("WHOLE") else ""
            if c.get("TAIL"):
                epi += f" + {c['TAIL']}-row tail" if c.get("WHOLE") else f", last block {c['TAIL']} wide"
            if c.get("ROW_TAIL"):  # its K step: the loop of the programs without rows to take, the smaller one
                epi += f", up to {c['ROW_TAIL']} last rows with the block before"
        ops = "/".join(str(p.get(k)) for k in ("A", "C") if k in p) or "/".join(str(v) for v in list(p.values())[:2])
        warn = "yes" if any("C7515" in w for w in r["ptxas_warnings"]) else ""
        # a flattened tile loop has no K loop of its own: its "K step" is the whole loop, the epilogue included
        loads = r["loads"] + (", tile and K loops as one" if c.get("FLATTEN") else "")
        loads += ", epilogue through TMA" if c.get("EPI_TMA") else ""  # C, the residual, the pre-activation
        # GELU or GELU' under the next tile's K steps, at most this many chunks of the tile before a step
        loads += f", epilogue one tile behind ({c['GELU_BEHIND']} a K step)" if c.get("GELU_BEHIND") else ""
        launched = r.get("launched_warps", r["warps"])  # a warp-specialised tile: the config's warps (all warps)
        warps = r["warps"] if launched == r["warps"] else f"{r['warps']} ({launched})"
        lines.append(
            f"| {r['kernel']} | {ops} | {epi} | {tile} | {warps} | {r['stages']} | {loads} | "
            f"{r['k_step']} ({r['k_step_mma']}) | {r['tile_rest']} | {r['wgmma_wait']} | {r['regs']} | "
            f"{r['shared'] // 1024} | {r['blocks_per_sm']} | {warn} |"
        )
    return "\n".join(lines)
