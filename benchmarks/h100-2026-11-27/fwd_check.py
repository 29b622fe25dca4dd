# forward only, bf16, every forward config forced at a length it takes: max |ours - fp64 ref| beside torch bf16's
import sys

import pytest
import torch
from helpers import force_config

from fastvit_kernels.configs import ATTENTION_FWD_CONFIGS
from fastvit_kernels.ops import attention, attention_ref, fused_attention

dev = "cuda" if torch.cuda.is_available() else "cpu"
B = int(sys.argv[1])
for i, cfg in enumerate(ATTENTION_FWD_CONFIGS):
    kw = cfg.kwargs
    n = 65 if kw["WHOLE"] and kw["TAIL"] else 60 if kw["WHOLE"] and kw["BLOCK_M"] == 64 else 70
    qkv = torch.randn(B, n, 3 * 2 * 64, device=dev).to(torch.bfloat16)
    mp = pytest.MonkeyPatch()
    force_config(mp, fused_attention._fwd, cfg)
    with torch.no_grad():
        ours = attention(qkv, 2).double()
    mp.undo()
    ref = attention_ref(qkv.double(), 2)
    low = attention_ref(qkv, 2).double()
    e, el = (ours - ref).abs().max().item(), (low - ref).abs().max().item()
    print(f"fwd {i} {cfg} N={n}: err {e:.1e} torch-bf16 {el:.1e} nan={ours.isnan().any().item()}", flush=True)
