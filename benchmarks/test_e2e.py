"""End to end: a training step (forward, cross-entropy, backward, fused AdamW) and inference, same weights and inputs
for every row of a group. Groups: (workload, mode, precision)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from common import gemm_backends, measure, need_cuda, settle_training_step

from fastvit_kernels import cuda_graph_step, plan, step_choice, vit_base_patch16_224, vit_cifar10

# workload -> (preset, batch for train, batch for inference); reduced sizes run the eager rows on a CPU
WORKLOADS = {
    "cifar10": (vit_cifar10, {}, 512, 512),
    # a batch of 8: the GPU waits for the host, which the step plans (fastvit_kernels/plan.py) are about
    "cifar10-b8": (vit_cifar10, {}, 8, 8),
    "vitb16-224": (vit_base_patch16_224, {}, 64, 128),
}
B8_ROWS = {"ours", "ours-unplanned", "ours-indirect", "ours-fresh", "ours+cudagraph", "eager-sdpa"}
CPU_WORKLOADS = {"cifar10": (vit_cifar10, dict(depth=2, dim=192, heads=3, mlp_dim=768), 16, 32)}
ROWS = [
    "ours",  # each GEMM by the candidate measured faster for its shape (Triton or cuBLAS; the row's `gemm` says)
    "ours-triton",  # every GEMM ours (FASTVIT_GEMM=triton): the row the fast-path goals are about
    "ours+cudagraph",
    "ours-unplanned",  # FASTVIT_PLAN=0: the model's forward and backward on every step, no step plan replayed
    "ours-indirect",  # FASTVIT_PLAN=triton: step plans whose launches go through Triton's JITFunction.run (batch 8)
    "ours-fresh",  # FASTVIT_ARENA=0: step plans that allocate their temporaries afresh (fastvit_kernels/arena.py)
    "ours-compile",
    "ours-compile-reduce-overhead",
    "eager-math",
    "eager-sdpa",
    "timm",
    "compile",
    "compile-reduce-overhead",
]
FP32_ROWS = {"ours", "ours+cudagraph", "eager-math", "eager-sdpa"}  # the compile rows cost minutes: bf16 only
_BASE = {}


def _describe(row, model, mode):
    """For our rows: the GEMM backends, and beside the host time what the step plans replay (plan.summary)."""
    if not row.startswith("ours"):
        return None
    training = mode == "train" and "compile" not in row and not row.endswith("+cudagraph")
    backends = gemm_backends(training=model if training else None)
    if "compile" in row:
        return backends
    return lambda: {**backends(), "plan": plan.summary(model), **_step_choice(model)}


def _step_choice(model):
    """{"step_choice": the training step's GEMM variant kept and both variants' median steps} (step_choice.py: the
    two timed side by side in this process before the row's rounds), where it was timed."""
    timed = [c.report() for c in step_choice.choices(model).values() if c.medians]
    return {"step_choice": timed[0] if len(timed) == 1 else timed} if timed else {}


def _base_model(name, device):
    key = (name, device.type)
    if key not in _BASE:
        table = WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
        preset, overrides, train_b, infer_b = table[name]
        torch.manual_seed(0)
        _BASE[key] = (preset(**overrides).to(device), train_b, infer_b)
    return _BASE[key]


def _timm_model(ours):
    timm = pytest.importorskip("timm")
    blk = ours.blocks[0]
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=ours.patch_embed.img_size,
        patch_size=ours.patch_embed.patch_size,
        num_classes=ours.num_classes,
        embed_dim=ours.embed_dim,
        depth=len(ours.blocks),
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / ours.embed_dim,
    )
    m.load_state_dict(ours.state_dict())
    return m.to(next(ours.parameters()).device)


def _make_model(row, base):
    if row == "timm":
        return _timm_model(base)
    m = copy.deepcopy(base)
    if row.startswith("ours"):
        m.set_backend("triton")
        if row == "ours-compile":
            return torch.compile(m)  # our ops are torch.library custom ops: Inductor fuses the glue around them
        if row == "ours-compile-reduce-overhead":
            return torch.compile(m, mode="reduce-overhead")
        return m
    m.set_backend("torch", attn_impl="math" if row == "eager-math" else "sdpa")
    if row == "compile":
        return torch.compile(m)
    if row == "compile-reduce-overhead":
        return torch.compile(m, mode="reduce-overhead")
    return m


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_e2e(benchmark, bench_opts, device, workload, mode, precision, row, monkeypatch):
    if device.type == "cpu":
        if workload not in CPU_WORKLOADS or precision != "fp32" or row not in ("eager-math", "eager-sdpa"):
            pytest.skip("without CUDA only the eager rows run, at reduced size, in fp32")
    else:
        if precision == "fp32" and row not in FP32_ROWS:
            pytest.skip("compile rows are measured in bf16 only (each costs minutes of compilation)")
        if workload == "cifar10-b8" and (precision != "bf16" or row not in B8_ROWS):
            pytest.skip("batch 8 is about the host's time: bf16, ours with and without plans or graphs, eager SDPA")
        if row == "ours-indirect" and workload != "cifar10-b8":
            pytest.skip("the plans' direct launches against Triton's: measured where the host's time shows, batch 8")
        if workload == "vitb16-224" and (precision != "bf16" or "compile" in row or row == "ours-fresh"):
            pytest.skip("ViT-B/16 shows the kernels are not tuned to one shape: bf16, no compile rows")
        if row == "ours-fresh" and precision != "bf16":
            pytest.skip("the arena against fresh allocations: CIFAR-10 bf16, where the training step waits on the host")
    if row.startswith("ours"):
        need_cuda(device)
    if row == "ours-triton":
        monkeypatch.setenv("FASTVIT_GEMM", "triton")
    if row == "ours-unplanned":
        monkeypatch.setenv("FASTVIT_PLAN", "0")
    if row == "ours-indirect":
        monkeypatch.setenv("FASTVIT_PLAN", "triton")
    if row == "ours-fresh":
        monkeypatch.setenv("FASTVIT_ARENA", "0")
    base, train_b, infer_b = _base_model(workload, device)
    batch = train_b if mode == "train" else infer_b
    model = _make_model(row, base)
    graphed = row.endswith("+cudagraph")
    torch.manual_seed(1)
    h, w = base.patch_embed.img_size
    x = torch.randn(batch, 3, h, w, device=device)
    y = torch.randint(0, base.num_classes, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=not graphed)
    # fp32 rows: TF32 matmuls for every row alike (cuBLAS, Inductor and our dot_precision all read this one setting)
    torch.set_float32_matmul_precision("high" if precision == "fp32" else "highest")
    flops = base.flops_per_image() * batch * (3 if mode == "train" else 1)

    if mode == "train":
        model.train()
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, capturable=graphed)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode(), amp:
                model(x)

    fn = cuda_graph_step(step) if graphed else step
    if mode == "train" and row.startswith("ours") and device.type == "cuda":
        settle_training_step(fn, model, device)  # its GEMM variant timed both ways before the rounds
    warmup = bench_opts["warmup"] + (5 if "compile" in row else 0)  # compile: warm until compiled
    measure(
        benchmark,
        fn,
        device=device,
        opts=bench_opts,
        group=f"{workload}/{mode}/{precision}",
        row=row,
        items=batch,
        flops=flops,
        peak_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        warmup=warmup,
        host=True,
        describe=_describe(row, model, mode),
    )
    torch.set_float32_matmul_precision("highest")
