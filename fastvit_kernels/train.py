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
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .backend import use_triton
from .data import DatasetError, DeviceLoader, download_cifar10, load_cifar10
from .model import PRESETS, ViT

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
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "default", "reduce-overhead"],
        help="torch.compile the model (our kernels are custom ops: no graph break); reduce-overhead "
        "adds CUDA graphs, which pay at CIFAR-10 sizes where launches dominate",
    )
    p.add_argument("--max-train-batches", type=int, default=None, help="cap batches per epoch (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


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
    from .ops._common import interpreting

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


# ---------------------------------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------------------------------
def _setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def _all_sum(values, device, world):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: the last good checkpoint is never left half
    written, whatever interrupts the save."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class GracefulStop:
    """First Ctrl-C: finish the batch in flight, save, exit (the resume is then exact). A second Ctrl-C stops at once.

    Under DDP every rank gets the signal, possibly during different batches, so the decision is taken together
    (a max all-reduce of the flag after each batch) and every rank stops after the same batch.
    """

    def __init__(self, device, world):
        self.requested, self.device, self.world, self._old = False, device, world, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this batch, then saving (Ctrl-C again to stop at once)", flush=True)

    def should_stop(self) -> bool:
        if self.world == 1:
            return self.requested
        return _all_sum([float(self.requested)], self.device, self.world)[0] > 0


def lr_at(step, args, steps_per_epoch):
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    total = max(1, args.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def evaluate(model, loader, amp, device, world):
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.inference_mode(), amp:
        for x, y in loader:
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], device, world)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _amp_name(device, amp):
    return amp or ("bf16" if device.type == "cuda" else "off")


def _autocast(device, amp):
    amp = _amp_name(device, amp)
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _plot(log_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in log_rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in log_rows], marker="o", label="train")
    a.plot(ep, [r["test_loss"] for r in log_rows], marker="o", label="test")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [100 * r["train_acc"] for r in log_rows], marker="o", label="train")
    b.plot(ep, [100 * r["test_acc"] for r in log_rows], marker="o", label="test")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def train(argv=None):
    args = build_parser().parse_args(argv)
    device, rank, world = _setup_distributed(args.device)
    main_rank = rank == 0
    _check_backend(args.backend, device)
    out = _check_out_dir(args.out_dir)  # created only once everything below has worked: no empty folders
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(out / "last.pt", device)
        model_args = _resume_recipe(args, _given(argv), ckpt, out / "last.pt")
    else:
        model_args = parse_model_args(args.model_arg)
    (train_x, train_y), (test_x, test_y) = _load_data(args, main_rank, world)

    torch.manual_seed(args.seed)
    model = build_model(args.preset, args.backend, model_args)
    if args.pretrained and ckpt is None:  # a resume takes the weights from its checkpoint
        from .interop import load_pretrained_into

        report = load_pretrained_into(model, args.pretrained)
        if main_rank:
            print(f"loaded {args.pretrained}: {report}")
    model.to(device)
    if main_rank:
        runs = "Triton kernels" if use_triton(args.backend, device) else "eager PyTorch"
        params = sum(p.numel() for p in model.parameters())
        print(
            f"fastvit-train: {args.preset} {model_args or ''} ({params / 1e6:.2f}M parameters) on {device}, "
            f"{runs}, autocast {_amp_name(device, args.amp)}; CIFAR-10: {len(train_y):,} training and "
            f"{len(test_y):,} test images",
            flush=True,
        )
    image_size = model.patch_embed.img_size[0]
    train_loader = DeviceLoader(
        train_x,
        train_y,
        args.batch_size // world,
        device,
        train=True,
        seed=args.seed,
        image_size=image_size,
        rank=rank,
        world_size=world,
    )
    test_loader = DeviceLoader(
        test_x,
        test_y,
        args.batch_size // world,
        device,
        train=False,
        image_size=image_size,
        rank=rank,
        world_size=world,
    )
    steps_per_epoch = len(train_loader)
    if args.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.max_train_batches)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_y)} training images give no full batch of {args.batch_size}")

    # weight decay on the matrices only: not on biases, LayerNorm, or what the model exempts (timm's convention:
    # the position embedding and the class token)
    groups = {True: [], False: []}
    exempt = model.no_weight_decay()
    for n, p in model.named_parameters():
        groups[p.ndim >= 2 and n not in exempt].append(p)
    opt = torch.optim.AdamW(
        [dict(params=groups[True], weight_decay=args.weight_decay), dict(params=groups[False], weight_decay=0.0)],
        lr=args.lr,
        fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
    ddp_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile != "off":  # checkpoints still come from `model`: no _orig_mod. prefix in their keys
        ddp_model = torch.compile(ddp_model, mode=None if args.compile == "default" else args.compile)
    amp = _autocast(device, args.amp)

    start_epoch, start_batch, best_acc, log_rows, partial = 0, 0, 0.0, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, best_acc = ckpt["epoch"], ckpt["batch"], ckpt["best_acc"]
        log_rows, partial = ckpt["log"], ckpt.get("partial")
        # RNG states are CPU byte tensors, whatever map_location moved them to
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
        if main_rank:  # epochs counted from 1 here as everywhere the user reads them
            print(
                f"resumed from {out / 'last.pt'}: epoch {start_epoch + 1}, batch {start_batch}, best "
                f"{100 * best_acc:.2f}%"
            )
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)

    def state(epoch, batch, partial_sums):
        return dict(
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            scaler=scaler.state_dict(),
            epoch=epoch,
            batch=batch,
            best_acc=best_acc,
            log=log_rows,
            partial=partial_sums,
            args=vars(args),
            model_args=model_args,
            preset=args.preset,
            rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        )

    epoch, resume_at, sums = start_epoch, start_batch, partial
    with GracefulStop(device, world) as stop:
        try:
            for epoch in range(start_epoch, args.epochs):
                model.train()
                train_loader.epoch = epoch
                order = train_loader._indices()
                first = start_batch if epoch == start_epoch else 0
                sums = (
                    partial
                    if (epoch == start_epoch and partial)
                    else dict(loss=0.0, correct=0.0, count=0.0, data_s=0.0, step_s=0.0)
                )
                bar = tqdm(
                    range(first, steps_per_epoch),
                    desc=f"epoch {epoch + 1}/{args.epochs}",
                    leave=False,
                    disable=args.no_progress or not main_rank,
                    dynamic_ncols=True,
                )
                for i in bar:
                    resume_at = i  # until this batch completes, a hard stop resumes at it
                    t0 = time.perf_counter()
                    x, y = train_loader.batch(order, i)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t1 = time.perf_counter()
                    for group in opt.param_groups:
                        group["lr"] = lr_at(epoch * steps_per_epoch + i, args, steps_per_epoch)
                    with amp:
                        logits = ddp_model(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sums["loss"] += loss.item() * len(y)  # .item() syncs: step time below is the real GPU time
                    sums["correct"] += (logits.argmax(1) == y).sum().item()
                    sums["count"] += len(y)
                    t2 = time.perf_counter()
                    sums["data_s"] += t1 - t0
                    sums["step_s"] += t2 - t1
                    bar.set_postfix(
                        loss=f"{sums['loss'] / sums['count']:.3f}",
                        acc=f"{sums['correct'] / sums['count']:.3f}",
                        img_s=f"{sums['count'] / max(sums['step_s'] + sums['data_s'], 1e-9):,.0f}",
                    )
                    resume_at = i + 1
                    if stop.should_stop():
                        raise KeyboardInterrupt
                loss_sum, correct, count, data_s, step_s = _all_sum(
                    [sums["loss"], sums["correct"], sums["count"], sums["data_s"], sums["step_s"]], device, world
                )
                test_loss, test_acc = evaluate(ddp_model, test_loader, amp, device, world)
                row = dict(
                    epoch=epoch + 1,
                    train_loss=loss_sum / count,
                    train_acc=correct / count,
                    test_loss=test_loss,
                    test_acc=test_acc,
                    lr=opt.param_groups[0]["lr"],
                    img_per_s=count / ((data_s + step_s) / world),
                    data_s=data_s / world,
                    step_s=step_s / world,
                )
                log_rows.append(row)
                improved = test_acc > best_acc
                best_acc = max(best_acc, test_acc)
                if main_rank:
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(
                        f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}% | "
                        f"test loss {test_loss:.4f} acc {100 * test_acc:.2f}% | {row['img_per_s']:,.0f} img/s "
                        f"(data {data_s / world:.1f}s, step {step_s / world:.1f}s)",
                        flush=True,
                    )
                    save_checkpoint(out / "last.pt", state(epoch + 1, 0, None))
                    if improved:
                        save_checkpoint(out / "best.pt", state(epoch + 1, 0, None))
                    _plot(log_rows, out / "curves.png")  # every epoch: an interrupted run has its curves too
        except KeyboardInterrupt:
            if main_rank:
                save_checkpoint(out / "last.pt", state(epoch, resume_at, sums))
                print(
                    f"interrupted: saved {out / 'last.pt'} at epoch {epoch + 1}, batch {resume_at}; --resume continues "
                    "there",
                    flush=True,
                )
            if world > 1:
                dist.destroy_process_group()
            return 130
    if main_rank and log_rows:
        last = log_rows[-1]
        print(
            f"done: {len(log_rows)} epochs, final test accuracy {100 * last['test_acc']:.2f}%, best "
            f"{100 * best_acc:.2f}%, {last['img_per_s']:,.0f} img/s; {out}/{{last.pt,best.pt,log.jsonl,curves.png}}"
        )
    if world > 1:
        dist.destroy_process_group()
    return 0


def evaluate_checkpoint(argv=None):
    args = build_parser(eval_only=True).parse_args(argv)
    device, rank, world = _setup_distributed(args.device)
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
    t = time.perf_counter()
    loss, acc = evaluate(model, loader, _autocast(device, args.amp), device, world)
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


if __name__ == "__main__":
    main()
