"""Compile every kernel in every configuration it may launch for sm_90 (and sm_80), without a GPU.

Run as a script (the test does it in a subprocess without TRITON_INTERPRET): prints one JSON line per compile with
the shared memory it needs and whether its PTX uses wgmma. The interpreter accepts what the GPU compiler rejects
(tl.dot dims < 16, non-power-of-two blocks, too much shared memory); this catches those here.
"""

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import sass_report  # beside this file

FLOAT_ARGS = {"eps", "qk_scale_log2", "sm_scale"}
# Strides that are 1 at run time for contiguous inputs. Triton's JIT specialises an integer argument equal to 1 into a
# constant and marks pointers and strides divisible by 16; that is what lets it vectorise and pipeline the loads
# (cp.async), which is where most of the shared memory goes. Compiling without it measured a third of the real
# shared memory of a bf16 GEMM (32 KB against 96 KB), so the check specialises as the JIT would.
UNIT_STRIDES = {
    "linear_fwd_kernel": ("stride_ak", "stride_cn", "stride_rn", "stride_pn"),
    "linear_dw_kernel": ("stride_gf", "stride_xk"),
    "linear_residual_layernorm_kernel": ("stride_ak", "stride_bk"),  # B is W.t(): unit stride along K
    "patch_embed_fwd_kernel": ("stride_iw", "stride_wk"),
    "patch_embed_bwd_dw_kernel": ("stride_iw",),
    "patch_embed_bwd_dx_kernel": ("stride_iw", "stride_wk"),
}
# Feature sizes that are multiples of 16 in every model we ship (D, hidden, 3D, C * ph * pw); the JIT marks such
# arguments divisible by 16, which is what lets it prove a masked K tile contiguous (and, in the LayerNorm backward,
# fold D's row offsets: 128 registers against 191 at D = 384, triton 3.6). Token counts (65, 197) are not: the
# attention kernels' N. Their D (heads x head dim, q to k in a row of qkv) is: compiled without that, the forward's
# K/V loads were two- or four-byte copies and its registers not the ones a GPU runs (64 x 64 query-block tile:
# 116 against 124, triton 3.6).
ALIGNED_SIZES = {"N", "K", "NF", "KF", "D"}
# the GEMMs whose ptxas notes tests/test_compile_targets.py reads (C7515: serialised wgmma)
PTXAS_CHECKED = {"linear_fwd_kernel", "linear_dw_kernel", "linear_residual_layernorm_kernel"}
TT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "i32": "*i32"}


def _variants(cap):
    """(kernel name, module, pointer dtypes, constexprs, num_warps, num_stages) for every launch configuration."""
    # the kernels from fastvit_kernels.kernels, the configurations and pruning from fastvit_kernels.tuning
    from fastvit_kernels import configs as tn
    from fastvit_kernels.kernels import attention as atk
    from fastvit_kernels.kernels import attention_bwd as atb
    from fastvit_kernels.kernels import gemm
    from fastvit_kernels.kernels import gemm_layernorm as gln
    from fastvit_kernels.kernels import layernorm as lnk
    from fastvit_kernels.kernels import patch_embed as pek
    from fastvit_kernels.kernels import reduce as red

    out = []

    def add(kernel, configs, ptrs, consts_list, prune=None, full=True, hot=lambda consts: True):
        """Every config for each constexpr set on the hot path (when full: registers depend on every flag, so the spill
        check needs them all); the other sets with the first and the largest config (shared memory grows with the
        tile, so those two bound the rest)."""

        def size(c):
            return c.num_stages * sum(v for k, v in c.kwargs.items() if k != "BLOCK_K") * c.kwargs.get("BLOCK_K", 64)

        for i, consts in enumerate(consts_list):
            kept = configs
            if prune:  # what the launcher would keep for these dtypes on this target
                fakes = {
                    n: SimpleNamespace(element_size=lambda dt=dt: 4 if dt == "fp32" else 2, device=f"sm_{cap}")
                    for n, dt in ptrs.items()
                    if dt is not None
                }
                kept = prune(configs, dict(consts, **fakes))
            every = full and (i == 0 or hot(consts))
            chosen = kept if every else list({id(c): c for c in (kept[0], max(kept, key=size))}.values())
            jit = kernel.fn if hasattr(kernel, "fn") else kernel  # @triton.heuristics wraps the jit function
            for cfg in chosen:
                regcap = {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}  # a launch option, carried with the consts
                out.append(
                    (
                        jit.__name__,
                        jit.__module__,
                        ptrs,
                        {**consts, **cfg.kwargs, **regcap},
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )

    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee"
        heads = [
            dict(HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), DOT_PRECISION=prec)
            for d in (64, 256, 16, 32, 80, 128)
        ]
        if dt == "fp16":
            heads = heads[:1]
        if dt == "fp32":  # fp32 attention (ieee dots) compiles slowly: the smallest and largest head dims bound it
            heads = heads[:2]
        io = {"QKV": dt, "OUT": dt, "DO": dt, "DQKV": dt, "LSE": "fp32", "DELTA": "fp32"}
        full = dt == "bf16"  # every config in bf16; fp16/fp32 with the first and the largest
        vit_heads = lambda c: c["HEAD_DIM"] <= 64  # noqa: E731 - the head dims of the shipped ViTs
        add(atk.attention_fwd_kernel, tn.ATTENTION_FWD_CONFIGS, io, heads, tn.prune_attention, full, vit_heads)
        # dK/dV with the qkv bias gradient's partial rows, as the model launches it (every config where the forward
        # has them all), and without them (the attention op alone: the first and the largest); dQ has no rows
        dkdv, dq = atb.attention_bwd_dkdv_kernel, atb.attention_bwd_dq_kernel
        rows_heads = [dict(h, HAS_COLSUM=True) for h in heads]
        add(
            dkdv,
            tn.ATTENTION_BWD_DKDV_CONFIGS,
            dict(io, COLSUM="fp32"),
            rows_heads,
            tn.prune_attention,
            full,
            vit_heads,
        )
        plain = [dict(heads[0], HAS_COLSUM=False)]
        add(dkdv, tn.ATTENTION_BWD_DKDV_CONFIGS, dict(io, COLSUM=None), plain, tn.prune_attention, False)
        add(dq, tn.ATTENTION_BWD_DQ_CONFIGS, io, heads, tn.prune_attention, full, vit_heads)

    # (residual stream, compute dtype): the GEMM operands are in the compute dtype, the residual and the output of
    # the residual epilogue in the stream's. A pointer given as None is absent (its flag derived from that).
    streams = [("bf16", "bf16"), ("fp32", "bf16"), ("fp32", "fp32"), ("fp16", "fp16")]
    epilogues = [  # (epilogue, bias given, pre-activation given), the hot path's launches first
        ("gelu", True, True),
        ("gelu", True, False),
        ("none", True, False),
        ("residual", True, False),
        ("gelu_grad", False, True),  # with the tiles' column sums (fc1's bias gradient), as the model launches it
    ]
    for stream, w in streams:
        f32 = "fp32"
        # fp16, and fp32 weights (ieee dots compile slowly): the heaviest epilogues only
        chosen = epilogues if stream != "fp16" and w != "fp32" else epilogues[:1] + epilogues[-1:]
        full = stream != "fp16" and w != "fp32"  # fp32-only GEMMs: first and largest tiles (ieee dots, no wgmma)
        for epi, bias, pre in chosen:
            ptrs = {
                "A": w,
                "B": w,
                "C": stream if epi == "residual" else w,
                "BIAS": w if bias else None,
                "RES": stream if epi == "residual" else None,
                "PRE": w if pre else None,
                "COLSUM": f32 if epi == "gelu_grad" else None,
                "DB": w if epi == "gelu_grad" else None,  # fc1's bias gradient, in the weights' dtype
                "ARRIVED": "i32" if epi == "gelu_grad" else None,
            }
            # TMA where the launcher allows it: Hopper; B K-major, or N-major where GELU' reads W2 untransposed (fc2's dX)
            consts = dict(
                EPILOGUE=epi,
                DOT_PRECISION="ieee",
                GROUP_M=tn.GROUP_M,
                HAS_BIAS=bias,
                STORE_PRE=epi == "gelu" and pre,
                TMA_OK=cap >= 90,
                EPI_TMA_OK=cap >= 90,  # C, the residual and the pre-activation through descriptors too
                B_KMAJOR=epi != "gelu_grad",
                HAS_COLSUM=epi == "gelu_grad",
            )
            add(gemm.linear_fwd_kernel, tn.LINEAR_FWD_CONFIGS, ptrs, [consts], tn.prune_linear_fwd, full)
        # proj / fc2 with the next LayerNorm in the epilogue: D = 384 (three 128-column chunks) is the hot path,
        # 512 the widest, 100 one masked chunk
        gln_ptrs = {"A": w, "B": w, "BIAS": w, "RES": stream, "C": stream, "LN_W": f32, "LN_B": f32, "Y": w}
        gln_ptrs.update(MEAN=f32, RSTD=f32)
        gln_consts = [  # TMA where the launcher allows it: Hopper (K-major operands, 16-byte rows in the models)
            dict(HAS_BIAS=True, DOT_PRECISION="ieee", BLOCK_N=bn, N_CHUNKS=n, TMA_OK=cap >= 90)
            for bn, n in ((128, 3), (128, 4), (128, 1))
        ]
        hot = lambda c: c["N_CHUNKS"] == 3  # noqa: E731 - D = 384, the CIFAR-10 and ViT-S width
        add(
            gln.linear_residual_layernorm_kernel,
            tn.LINEAR_LN_CONFIGS,
            gln_ptrs,
            gln_consts,
            tn.prune_linear_ln,
            full,
            hot,
        )
        # the weight gradient with its rows split (the partials' sum in the kernel's last program: the hot path) and
        # whole (one split)
        dw_ptrs = {"G": w, "X": w, "DW_OUT": w, "DB_OUT": w, "DW_PART": f32, "DB_PART": f32, "ARRIVED": "i32"}
        add(
            gemm.linear_dw_kernel,
            tn.LINEAR_DW_CONFIGS,
            dw_ptrs,
            [dict(HAS_DBIAS=True, SPLIT=split, DOT_PRECISION="ieee") for split in (True, False)],
            tn.prune_linear_dw,
            full,
        )
        ln_ptrs = {
            "DY": w,
            "X": stream,
            "MEAN": f32,
            "RSTD": f32,
            "W": f32,
            "DRES": stream,
            "DX": stream,
            "DX_LOW": w if stream != w else None,  # under autocast: the GEMMs' operand beside the fp32 gradient
            "PART": f32,
        }
        for dim in (64, 100, 384, 768, 1024, 8192) if full else (768,):  # 64: the narrow rows' 32-row backward
            bm, bd, warps = tn.row_kernel_params(dim, **tn.LAYERNORM_FWD_PARAMS)
            for has_res in (False, True):  # the row kernel alone, and the add + LayerNorm after a cuBLAS GEMM
                fwd_ptrs = {"X": stream, "RES": None, "S": None, "W": f32, "B": f32, "Y": w, "MEAN": f32, "RSTD": f32}
                if has_res:
                    fwd_ptrs.update(X=w, RES=stream, S=stream)
                consts = dict(HAS_RES=has_res, BLOCK_M=bm, BLOCK_D=bd)
                out.append(("layernorm_fwd_kernel", lnk.__name__, fwd_ptrs, consts, warps, 3))
            # every config the tuner may time at CIFAR-10's width with dx's sums (proj's and fc2's bias gradients:
            # the training step's hot path), the first and largest elsewhere and without them
            low = ln_ptrs["DX_LOW"] is not None
            bwd_consts = [
                dict(HAS_DRES=True, HAS_DX_LOW=low, SUM_DX=s, BLOCK_D=tn.next_pow2(dim)) for s in (True, False)
            ]
            every = full and dim == 384
            add(
                lnk.layernorm_bwd_kernel,
                tn.LAYERNORM_BWD_CONFIGS,
                ln_ptrs,
                bwd_consts,
                tn.prune_layernorm_bwd,
                every,
                hot=lambda consts: consts["SUM_DX"],
            )
        # column sums: the bias gradient beside cuBLAS's weight gradient (G and its sums in the compute dtype, here
        # where the stream shares it), and the LayerNorm backward's fp32 partial rows summed into the LayerNorm
        # weights' dtype (the stream's; fp32 under autocast), with the next GEMM's bias gradient in the compute dtype
        # and without it. fp32 models' are the autocast variant.
        colsum = {"G": w, "PRE": None, "DG": None, "PART": f32, "OUT": w, "OUT2": None, "OUT3": None, "ARRIVED": "i32"}
        sums = dict(BLOCK_N=tn.COLUMN_SUM_BLOCK_N, HAS_OUT2=False, HAS_OUT3=False, HAS_PRE=False)
        if stream == w != f32:
            add(red.column_sum_kernel, tn.COLUMN_SUM_CONFIGS, colsum, [sums], None, full)
            # fc1's bias gradient with GELU's backward in the pass (cuBLAS's dgelu candidate)
            gelu_ptrs = dict(colsum, PRE=w, DG=w)
            add(red.column_sum_kernel, tn.COLUMN_SUM_CONFIGS, gelu_ptrs, [dict(sums, HAS_PRE=True)], None, full)
        if w != f32:
            ln_sums = dict(colsum, G=f32, OUT=stream, OUT2=stream)
            for has_out3 in (True, False):
                consts = [dict(sums, HAS_OUT2=True, HAS_OUT3=has_out3)]
                ptrs = dict(ln_sums, OUT3=w if has_out3 else None)
                add(red.column_sum_kernel, tn.COLUMN_SUM_CONFIGS, ptrs, consts, None, full)
        pe_ptrs = {
            "IMG": stream,
            "W": w,
            "BIAS": w,
            "POS": f32 if stream == "fp32" else w,
            "CLS": stream,
            "OUT": stream,
            "G": w,
            "DW_OUT": f32,
            "DW_PART": f32,
            "ARRIVED": "i32",
            "DIMG": stream,
        }
        patches = (4, 16) if full else (4,)
        add(
            pek.patch_embed_fwd_kernel,
            tn.PATCH_EMBED_FWD_CONFIGS,
            pe_ptrs,
            [dict(PH=ph, PW=ph, HAS_CLS=True, DOT_PRECISION="ieee", GROUP_M=tn.GROUP_M) for ph in patches],
            tn.prune_patch_embed_fwd,
            full,
        )
        add(
            pek.patch_embed_bwd_dw_kernel,
            tn.PATCH_EMBED_BWD_CONFIGS,
            pe_ptrs,
            [dict(PH=ph, PW=ph, SPLIT=split, DOT_PRECISION="ieee") for ph in patches for split in (True, False)],
            tn.prune_patch_embed_dw,
            full,
        )
        add(
            pek.patch_embed_bwd_dx_kernel,
            tn.PATCH_EMBED_BWD_CONFIGS,
            pe_ptrs,
            [dict(PH=ph, PW=ph, DOT_PRECISION="ieee") for ph in patches],
            tn.prune_patch_embed_dx,
            full,
        )
    return out


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (register spills) of a compiled kernel, read from its cubin with the
    cuobjdump that ships inside Triton's NVIDIA backend."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return dict(regs=int(m.group(1)), stack=int(m.group(2))) if m else dict(regs=None, stack=None)


def _compile(job):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, module, ptrs, consts, warps, stages, cap, report = job
    kernel = getattr(importlib.import_module(module), name)
    while not isinstance(kernel, triton.runtime.JITFunction):  # @triton.heuristics wraps the jit function
        kernel = kernel.fn
    options = dict(num_warps=warps, num_stages=stages)
    if "maxnreg" in consts:  # a register cap is a compile option, not a kernel argument (still reported in consts)
        options["maxnreg"] = consts["maxnreg"]
    consts = dict(consts, **{s: 1 for s in UNIT_STRIDES.get(name, ())})
    if consts.get("EPILOGUE") == "gelu_grad":  # that launch reads W2 untransposed: unit stride along N, not K
        consts["stride_bn"] = 1
    elif name == "linear_fwd_kernel":
        consts["stride_bk"] = 1  # W.t(): unit stride along K
    constexprs = {k: v for k, v in consts.items() if k != "maxnreg"}
    sig, attrs = {}, {}
    constexprs.update({a: None for a, dt in ptrs.items() if dt is None})
    # a constexpr left out would be compiled as a runtime integer (both sides of its `if` at once): name them all
    unnamed = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if unnamed:
        return dict(kernel=name, cap=cap, ptrs=ptrs, consts=consts, ok=False, error=f"constexprs not given: {unnamed}")
    for i, a in enumerate(kernel.arg_names):
        if a in consts or (a in ptrs and ptrs[a] is None):
            sig[a] = "constexpr"
        elif a in FLOAT_ARGS:
            sig[a] = "fp32"
        elif a in ptrs:
            sig[a] = TT[ptrs[a]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"
            if a.startswith("stride_") or (a in ALIGNED_SIZES and not (a == "N" and "HEAD_DIM" in consts)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    try:
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        ptx = c.asm["ptx"]
        res = dict(
            ok=True,
            shared=c.metadata.shared,
            wgmma="wgmma" in ptx,
            pipelined="cp.async" in ptx,  # cp.async.bulk.tensor (TMA) included
            tma="cp.async.bulk.tensor" in ptx,
            **_resource_usage(c.asm["cubin"]),
        )
        if cap == 90 and report:  # the offline performance report (tests/sass_report.py)
            # the warps the kernel launches with: a warp-specialised loop adds partitions beyond the config's warps
            launched = c.metadata.num_warps
            res.update(sass_report.analyse(c.asm["cubin"], ptx, cap, launched, res["shared"], res["regs"]))
            res["launched_warps"] = launched
        elif cap == 90 and name in PTXAS_CHECKED:  # the test's C7515 check needs ptxas's notes, not the SASS
            res["ptxas_warnings"] = sass_report.ptxas_warnings(ptx, cap)
        if cap == 90 and res["stack"]:  # the test's spill check: where the spills are reloaded
            res["local_in_k_loop"] = sass_report.local_memory_in_k_loop(c.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - reported per configuration
        res = dict(ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}")
    res["seconds"] = round(time.perf_counter() - start, 2)
    return dict(kernel=name, cap=cap, ptrs=ptrs, consts=consts, warps=warps, stages=stages, **res)


def _sm80_subset(variants):
    """sm_80 (A100, 164 KB of shared memory): per kernel, dtypes and flags, the config with the biggest tiles (the
    most shared memory), and not the bf16 GEMMs but the residual epilogue: the fp32 ones bound their tiles."""
    best = {}
    for v in variants:
        name, _, ptrs, consts, _, stages = v
        if "fp16" in ptrs.values() or ptrs.get("C") == ptrs.get("A") == "bf16" or ptrs.get("G") == "bf16":
            continue
        if consts.get("BLOCK_D", 0) > 1024 and "HEAD_DIM" not in consts:
            continue
        tiles = {k: c for k, c in consts.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        key = (
            name,
            json.dumps(ptrs, sort_keys=True),
            json.dumps({k: c for k, c in consts.items() if k not in tiles}, sort_keys=True),
        )
        size = (
            stages
            * (tiles.get("BLOCK_M", 1) + tiles.get("BLOCK_N", 1))
            * tiles.get("BLOCK_K", consts.get("BLOCK_D", 1))
        )
        if key not in best or size > best[key][0]:
            best[key] = (size, v)
    return [v for _, v in best.values()]


def jobs(caps, report=False):
    """One job a compile; `report`: with the SASS analysis of every sm_90 kernel (a second ptxas run and a SASS dump,
    ~1 s a job), else only ptxas's notes on the GEMMs, which the test checks for C7515."""
    variants = {cap: _variants(cap) if cap >= 90 else _sm80_subset(_variants(cap)) for cap in caps}
    return [v + (cap, report) for cap in caps for v in variants[cap]]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile for the GPU, not the interpreter"
    os.environ["FASTVIT_WARP_SPEC"] = "1"  # every tile the tuner may be offered, the warp-specialised ones included
    # compile_kernels.py [CAP ...] [--report FILE]: JSON lines, and with --report the GEMMs' SASS table in FILE
    argv = sys.argv[1:]
    report_path = argv.pop(argv.index("--report") + 1) if "--report" in argv else None
    caps = [int(c) for c in argv if c != "--report"] or [90, 80]
    results = []
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for r in pool.map(_compile, jobs(caps, report=report_path is not None), chunksize=4):
            print(json.dumps(r), flush=True)
            results.append(r)
    if report_path:
        import triton

        hot = [r for r in results if r["cap"] == 90 and "bf16" in r["ptrs"].values() and "fp32" != r["ptrs"].get("B")]
        head = f"sm_90, triton {triton.__version__}, bf16 operands; counts per warp, SASS instructions\n\n"
        with open(report_path, "w") as f:
            f.write(head + sass_report.report(hot) + "\n")
