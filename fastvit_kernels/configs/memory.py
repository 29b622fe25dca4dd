"""Shared memory: what a block may use on each device, and the prune function the GEMMs share."""

import torch

# Shared memory a block may use, by compute capability: sm_80 (A100) 163 KB, sm_86/89 99 KB, sm_90 (H100) 227 KB.
SMEM_BY_ARCH = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def smem_limit(device) -> int:
    """Bytes of shared memory one block may use on `device` (a torch device, or 'sm_80'-style target names)."""
    if isinstance(device, str) and device.startswith("sm_"):
        return SMEM_BY_ARCH[int(device[3:])]
    if getattr(device, "type", None) != "cuda":
        return 1 << 30  # the interpreter has no limit
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin or SMEM_BY_ARCH.get(props.major * 10 + props.minor, 101376)


def prune_gemm_configs(a_name, b_name, extra=None):
    """A prune function (configs, the launch's arguments by name -> the configs kept): drop the configs whose
    pipelined A and B tiles (stages x (BM x BK + BK x BN), in the operands' own dtypes), plus extra(config, arguments)
    bytes where given, would not fit the device's shared memory, as fp32 tiles of 128 x 256 do not on an A100. The
    smallest config is always kept (of a list that an earlier rule has not emptied)."""

    def prune(configs, args):
        a, b = args[a_name], args[b_name]
        limit = smem_limit(a.device)

        def need(c):
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            main = c.num_stages * (bm * bk * a.element_size() + bk * bn * b.element_size())
            return main + (extra(c, args) if extra else 0)

        kept = [c for c in configs if need(c) <= limit]
        return kept or [min(configs, key=need)] if configs else []

    return prune
