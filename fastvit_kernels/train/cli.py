"""Train and evaluate a ViT on CIFAR-10: `fastvit-train`, `fastvit-eval` (or `python -m fastvit_kernels.train`).

The recipe (defaults) aims at the anchors of the ViT-on-CIFAR-10 write-ups (ViT-Lite-7/4: 91.4%, omihub777/ViT-CIFAR:
90.9%) with `vit_cifar10`: AdamW (lr 1e-3, weight decay 0.05), 5 warm-up epochs then cosine to 1e-5, label smoothing
0.1, random crop (pad 4) and horizontal flip, bf16 autocast on a GPU, 200 epochs of batch 512.

Checkpoints (out-dir/last.pt, best.pt) are written atomically and hold everything a resume needs: model, optimiser,
schedule position, RNG state, epoch and batch, best accuracy. Ctrl-C saves and exits; --resume continues exactly
(the augmentation of each batch is a function of (seed, epoch, batch)). Runs under `torchrun --nproc_per_node=N`
(DistributedDataParallel, NCCL on GPUs, gloo on CPU); only rank 0 writes files.
"""

import argparse
import ast
import inspect
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..backend import use_triton
from ..data import DatasetError, DeviceLoader, download_cifar10, load_cifar10
from ..model import PRESETS, ViT
from .distributed import setup_distributed
from .loop import Run, amp_name, autocast, evaluate

# What defines a run besides the model: --resume takes these from the checkpoint and refuses contradicting values.
# (--epochs may change: a run can be extended.)
RECIPE = (
    "preset",
    "lr",
    "min_lr",
    "warmup_epochs",
    "schedule",
    "weight_decay",
    "label_smoothing",
    "batch_size",
    "seed",
    "amp",
    "pretrained",
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help."""


def _fail(message: str):
    """A user error: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


def build_parser(eval_only=False):
    p = argparse.ArgumentParser(
        prog="fastvit-eval" if eval_only else "fastvit-train", description=__doc__, formatter_class=_HelpFormatter
    )
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="auto: our Triton kernels on a GPU, eager PyTorch otherwise",
    )
    p.add_argument(
        "--amp",
        default=None,
        choices=["bf16", "fp16", "off"],
        help="autocast dtype (default: bf16 on a GPU, off on a CPU)",
    )
    p.add_argument("--batch-size", type=int, default=512, help="images per step, over all processes")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "default", "reduce-overhead"],
        help="torch.compile the model (our kernels are custom ops: no graph break); reduce-overhead "
        "adds CUDA graphs, which pay at CIFAR-10 sizes where launches dominate",
    )
    if eval_only:
        p.add_argument("checkpoint", help="a checkpoint written by fastvit-train (last.pt / best.pt)")
        return p
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision first (needs internet)")
    p.add_argument("--preset", default="vit_cifar10", choices=sorted(PRESETS), help="model configuration")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset argument, e.g. --model-arg depth=6 (repeatable)",
    )
    p.add_argument("--epochs", type=int, default=200, help="length of the run (a resumed run may extend it)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up length")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="after the warm-up")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's, on weight matrices only")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy")
    p.add_argument("--out-dir", default="runs/cifar10", help="checkpoints, log.jsonl and curves.png")
    p.add_argument("--seed", type=int, default=0, help="initialisation, shuffling and augmentation")
    p.add_argument("--resume", action="store_true", help="continue from out-dir/last.pt")
    p.add_argument("--pretrained", default=None, help="fine-tune from a timm or torchvision checkpoint file")
    p.add_argument("--max-train-batches", type=int, default=None, help="cap batches per epoch (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def _compile_mode(flag: str):
    """--compile's value as torch.compile's mode."""
    return None if flag == "default" else flag


def _literal(text: str):
    """A --model-arg value: a Python literal (False, 6, 0.1, (32, 32)), JSON's true/false/null, else the string."""
    words = {"true": True, "false": False, "null": None, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model_args(items) -> dict:
    """--model-arg KEY=VALUE items as constructor keywords; unknown or repeated keys are user errors. The values
    are checked by the constructor itself (build_model)."""
    params = set(inspect.signature(ViT.__init__).parameters) - {"self"}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            _fail(f"--model-arg expects KEY=VALUE, got {item!r}")
        if key == "backend":
            _fail("--model-arg backend: choose the backend with --backend")
        if key not in params:
            _fail(
                f"--model-arg {key}: the ViT has no such parameter (it takes {', '.join(sorted(params - {'backend'}))})"
            )
        if key in out:
            _fail(f"--model-arg {key} given twice")
        out[key] = _literal(text)
    return out


def build_model(preset: str, backend: str, model_args: dict) -> ViT:
    try:
        return PRESETS[preset](backend=backend, **model_args)
    except (TypeError, ValueError) as e:
        _fail(f"--model-arg: {e}")


def _given(argv) -> set:
    """The options the user typed (not their defaults): a parser whose every default is 'absent'."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _check_out_dir(path: str) -> Path:
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            _fail(f"--out-dir {out}: {p} is a file, not a folder")
    return out


def _check_backend(backend: str, device: torch.device) -> None:
    from ..ops._common import interpreting

    if backend == "triton" and device.type != "cuda" and not interpreting():
        _fail(f"--backend triton needs a CUDA GPU (this run is on {device}); use --backend auto or torch")


def load_checkpoint(path, device) -> dict:
    """A checkpoint written by fastvit-train, or a one-line error saying why the file is not one."""
    path = Path(path)
    if not path.is_file():
        _fail(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is not a checkpoint
        _fail(f"{path} is not a checkpoint torch can read ({type(e).__name__})")
    missing = [k for k in ("model", "preset", "model_args", "args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        _fail(f"{path} is not a fastvit-train checkpoint (it has no {', '.join(missing)})")
    return ckpt


def _resume_recipe(args, given, ckpt, path) -> dict:
    """Take the model and the recipe from the checkpoint; refuse typed arguments that contradict it."""
    saved = ckpt["args"]
    clash = [
        f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {saved.get(k)})"
        for k in RECIPE
        if k in given and getattr(args, k) != saved.get(k)
    ]
    if "model_arg" in given and parse_model_args(args.model_arg) != ckpt["model_args"]:
        clash.append(f"--model-arg {' '.join(args.model_arg)} (the run has {ckpt['model_args']})")
    if clash:
        _fail(f"--resume continues the run in {path}, and {'; '.join(clash)} contradict it")
    for k in RECIPE:
        setattr(args, k, saved.get(k, getattr(args, k)))
    return dict(ckpt["model_args"])


def _load_data(args, main_rank, world):
    if args.download and main_rank:
        try:
            download_cifar10(args.data_dir)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: the user is told which
            reason = " ".join(str(e).split())[:160]
            _fail(
                f"could not download CIFAR-10 ({type(e).__name__}: {reason}); without a network, put the "
                f"official cifar-10-batches-py folder under --data-dir"
            )
    if world > 1:
        dist.barrier()
    try:
        return load_cifar10(args.data_dir, train=True), load_cifar10(args.data_dir, train=False)
    except DatasetError as e:
        _fail(str(e))


def _optimizer(model, args, device):
    """AdamW with weight decay on the matrices only: not on biases, LayerNorm, or what the model exempts (timm's
    convention: the position embedding and the class token)."""
    groups = {True: [], False: []}
    exempt = model.no_weight_decay()
    for n, p in model.named_parameters():
        groups[p.ndim >= 2 and n not in exempt].append(p)
    params = [dict(params=groups[True], weight_decay=args.weight_decay), dict(params=groups[False], weight_decay=0.0)]
    return torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")


def _loaders(args, data, image_size, device, rank, world):
    (train_x, train_y), (test_x, test_y) = data
    common = dict(image_size=image_size, rank=rank, world_size=world)
    batch = args.batch_size // world
    train_loader = DeviceLoader(train_x, train_y, batch, device, train=True, seed=args.seed, **common)
    return train_loader, DeviceLoader(test_x, test_y, batch, device, train=False, **common)


def _build_model(args, model_args, resuming, device, main_rank):
    torch.manual_seed(args.seed)
    model = build_model(args.preset, args.backend, model_args)
    if args.pretrained and not resuming:  # a resume takes the weights from its checkpoint
        from ..interop import load_pretrained_into

        report = load_pretrained_into(model, args.pretrained)
        if main_rank:
            print(f"loaded {args.pretrained}: {report}")
    return model.to(device)


def _wrap(model, args, device, world):
    """What the steps call: DDP across ranks, torch.compile on request (checkpoints still come from `model`)."""
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile != "off":
        model = torch.compile(model, mode=_compile_mode(args.compile))
    return model


def train(argv=None):
    """fastvit-train: check the arguments, load the data, build the model, restore a resumed run, train."""
    args = build_parser().parse_args(argv)
    device, rank, world = setup_distributed(args.device)
    _check_backend(args.backend, device)
    out = _check_out_dir(args.out_dir)  # created only once everything below has worked: no empty folders
    ckpt = load_checkpoint(out / "last.pt", device) if args.resume else None
    model_args = _resume_recipe(args, _given(argv), ckpt, out / "last.pt") if ckpt else parse_model_args(args.model_arg)
    data = _load_data(args, rank == 0, world)
    model = _build_model(args, model_args, ckpt is not None, device, rank == 0)
    if rank == 0:
        _say_what_runs(args, model, model_args, device, data)
    train_loader, test_loader = _loaders(args, data, model.patch_embed.img_size[0], device, rank, world)
    steps = min(len(train_loader), args.max_train_batches or len(train_loader))
    if steps == 0:
        _fail(f"{len(data[0][1])} training images give no full batch of {args.batch_size}")
    run = Run(
        args=args,
        device=device,
        rank=rank,
        world=world,
        out=out,
        model=model,
        step_model=_wrap(model, args, device, world),
        opt=_optimizer(model, args, device),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda"),
        train_loader=train_loader,
        test_loader=test_loader,
        steps_per_epoch=steps,
        model_args=model_args,
    )
    if ckpt is not None:
        run.restore(ckpt, out / "last.pt")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    return run.run()


def _say_what_runs(args, model, model_args, device, data):
    runs = "Triton kernels" if use_triton(args.backend, device) else "eager PyTorch"
    params = sum(p.numel() for p in model.parameters())
    print(
        f"fastvit-train: {args.preset} {model_args or ''} ({params / 1e6:.2f}M parameters) on {device}, {runs}, "
        f"autocast {amp_name(device, args.amp)}; CIFAR-10: {len(data[0][1]):,} training and {len(data[1][1]):,} "
        "test images",
        flush=True,
    )


def evaluate_checkpoint(argv=None):
    args = build_parser(eval_only=True).parse_args(argv)
    device, rank, world = setup_distributed(args.device)
    _check_backend(args.backend, device)
    ckpt = load_checkpoint(args.checkpoint, device)
    model = build_model(ckpt["preset"], args.backend, ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    try:
        test_x, test_y = load_cifar10(args.data_dir, train=False)
    except DatasetError as e:
        _fail(str(e))
    loader = DeviceLoader(
        test_x,
        test_y,
        args.batch_size,
        device,
        train=False,
        image_size=model.patch_embed.img_size[0],
        rank=rank,
        world_size=world,
    )
    step_model = model if args.compile == "off" else torch.compile(model, mode=_compile_mode(args.compile))
    t = time.perf_counter()
    loss, acc = evaluate(step_model, loader, autocast(device, args.amp), device, world)
    if rank == 0:
        print(
            f"{args.checkpoint}: test accuracy {100 * acc:.2f}% (loss {loss:.4f}) on {len(test_y)} images, "
            f"{len(test_y) / (time.perf_counter() - t):,.0f} img/s"
        )
    return 0


def main():
    sys.exit(train())


def eval_main():
    sys.exit(evaluate_checkpoint())
