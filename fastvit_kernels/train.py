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

from .data import DatasetError, DeviceLoader, download_cifar10, load_cifar10
from .model import PRESETS


def build_parser(eval_only=False):
    p = argparse.ArgumentParser(prog="fastvit-eval" if eval_only else "fastvit-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="autocast dtype (default: bf16 on a GPU, off on a CPU)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    if eval_only:
        p.add_argument("checkpoint", help="a checkpoint written by fastvit-train (last.pt / best.pt)")
        return p
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision first (needs internet)")
    p.add_argument("--preset", default="vit_cifar10", choices=sorted(PRESETS))
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset argument, e.g. --model-arg depth=6 (repeatable)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--out-dir", default="runs/cifar10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from out-dir/last.pt")
    p.add_argument("--pretrained", default=None, help="fine-tune from a timm or torchvision checkpoint file")
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead"],
                   help="torch.compile the model (our kernels are custom ops: no graph break); reduce-overhead "
                        "adds CUDA graphs, which pay at CIFAR-10 sizes where launches dominate")  # fmt: skip
    p.add_argument("--max-train-batches", type=int, default=None, help="cap batches per epoch (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def _parse_model_args(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


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


def _autocast(device, amp):
    amp = amp or ("bf16" if device.type == "cuda" else "off")
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
    a.plot(ep, [r["train_loss"] for r in log_rows], label="train")
    a.plot(ep, [r["test_loss"] for r in log_rows], label="test")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [100 * r["train_acc"] for r in log_rows], label="train")
    b.plot(ep, [100 * r["test_acc"] for r in log_rows], label="test")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(argv=None):
    args = build_parser().parse_args(argv)
    device, rank, world = _setup_distributed(args.device)
    main_rank = rank == 0
    out = Path(args.out_dir)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    if args.download and main_rank:
        download_cifar10(args.data_dir)
    if world > 1:
        dist.barrier()
    try:
        train_x, train_y = load_cifar10(args.data_dir, train=True)
        test_x, test_y = load_cifar10(args.data_dir, train=False)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None

    torch.manual_seed(args.seed)
    model_args = _parse_model_args(args.model_arg)
    model = PRESETS[args.preset](backend=args.backend, **model_args)
    if args.pretrained:
        from .interop import load_pretrained_into

        report = load_pretrained_into(model, args.pretrained)
        if main_rank:
            print(f"loaded {args.pretrained}: {report}")
    model.to(device)
    image_size = model.patch_embed.img_size[0]
    train_loader = DeviceLoader(train_x, train_y, args.batch_size // world, device, train=True, seed=args.seed,
                                image_size=image_size, rank=rank, world_size=world)  # fmt: skip
    test_loader = DeviceLoader(test_x, test_y, args.batch_size // world, device, train=False,
                               image_size=image_size, rank=rank, world_size=world)  # fmt: skip
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
    opt = torch.optim.AdamW([dict(params=groups[True], weight_decay=args.weight_decay),
                             dict(params=groups[False], weight_decay=0.0)], lr=args.lr,
                            fused=device.type == "cuda")  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
    ddp_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile != "off":  # checkpoints still come from `model`: no _orig_mod. prefix in their keys
        ddp_model = torch.compile(ddp_model, mode=None if args.compile == "default" else args.compile)
    amp = _autocast(device, args.amp)

    start_epoch, start_batch, best_acc, log_rows, partial = 0, 0, 0.0, [], None
    if args.resume:
        ckpt_path = out / "last.pt"
        if not ckpt_path.is_file():
            raise SystemExit(f"error: --resume given but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, best_acc = ckpt["epoch"], ckpt["batch"], ckpt["best_acc"]
        log_rows, partial = ckpt["log"], ckpt.get("partial")
        # RNG states are CPU byte tensors, whatever map_location moved them to
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
        if main_rank:
            print(f"resumed from {ckpt_path}: epoch {start_epoch}, batch {start_batch}, best {100 * best_acc:.2f}%")

    def state(epoch, batch, partial_sums):
        return dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                    batch=batch, best_acc=best_acc, log=log_rows, partial=partial_sums, args=vars(args),
                    model_args=model_args, preset=args.preset, rng_cpu=torch.get_rng_state(),
                    rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)  # fmt: skip

    epoch, resume_at, sums = start_epoch, start_batch, partial
    with GracefulStop(device, world) as stop:
        try:
            for epoch in range(start_epoch, args.epochs):
                model.train()
                train_loader.epoch = epoch
                order = train_loader._indices()
                first = start_batch if epoch == start_epoch else 0
                sums = partial if (epoch == start_epoch and partial) else dict(loss=0.0, correct=0.0, count=0.0,
                                                                               data_s=0.0, step_s=0.0)  # fmt: skip
                bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                           disable=args.no_progress or not main_rank, dynamic_ncols=True)  # fmt: skip
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
                    bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.3f}", acc=f"{sums['correct'] / sums['count']:.3f}",
                                    img_s=f"{sums['count'] / max(sums['step_s'] + sums['data_s'], 1e-9):,.0f}")  # fmt: skip
                    resume_at = i + 1
                    if stop.should_stop():
                        raise KeyboardInterrupt
                loss_sum, correct, count, data_s, step_s = _all_sum(
                    [sums["loss"], sums["correct"], sums["count"], sums["data_s"], sums["step_s"]], device, world
                )
                test_loss, test_acc = evaluate(ddp_model, test_loader, amp, device, world)
                row = dict(epoch=epoch + 1, train_loss=loss_sum / count, train_acc=correct / count, test_loss=test_loss,
                           test_acc=test_acc, lr=opt.param_groups[0]["lr"], img_per_s=count / ((data_s + step_s) / world),
                           data_s=data_s / world, step_s=step_s / world)  # fmt: skip
                log_rows.append(row)
                improved = test_acc > best_acc
                best_acc = max(best_acc, test_acc)
                if main_rank:
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}% | "
                          f"test loss {test_loss:.4f} acc {100 * test_acc:.2f}% | {row['img_per_s']:,.0f} img/s "
                          f"(data {data_s / world:.1f}s, step {step_s / world:.1f}s)", flush=True)  # fmt: skip
                    save_checkpoint(out / "last.pt", state(epoch + 1, 0, None))
                    if improved:
                        save_checkpoint(out / "best.pt", state(epoch + 1, 0, None))
        except KeyboardInterrupt:
            if main_rank:
                save_checkpoint(out / "last.pt", state(epoch, resume_at, sums))
                print(f"interrupted: saved {out / 'last.pt'} at epoch {epoch + 1}, batch {resume_at}; --resume continues "
                      "there", flush=True)  # fmt: skip
            if world > 1:
                dist.destroy_process_group()
            return 130
    if main_rank and log_rows:
        _plot(log_rows, out / "curves.png")
        last = log_rows[-1]
        print(f"done: {len(log_rows)} epochs, final test accuracy {100 * last['test_acc']:.2f}%, best "
              f"{100 * best_acc:.2f}%, {last['img_per_s']:,.0f} img/s; {out}/{{last.pt,best.pt,log.jsonl,curves.png}}")  # fmt: skip
    if world > 1:
        dist.destroy_process_group()
    return 0


def evaluate_checkpoint(argv=None):
    args = build_parser(eval_only=True).parse_args(argv)
    device, rank, world = _setup_distributed(args.device)
    ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
    model = PRESETS[ckpt["preset"]](backend=args.backend, **ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    try:
        test_x, test_y = load_cifar10(args.data_dir, train=False)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    loader = DeviceLoader(test_x, test_y, args.batch_size, device, train=False,
                          image_size=model.patch_embed.img_size[0], rank=rank, world_size=world)  # fmt: skip
    t = time.perf_counter()
    loss, acc = evaluate(model, loader, _autocast(device, args.amp), device, world)
    if rank == 0:
        print(f"{args.checkpoint}: test accuracy {100 * acc:.2f}% (loss {loss:.4f}) on {len(test_y)} images, "
              f"{len(test_y) / (time.perf_counter() - t):,.0f} img/s")  # fmt: skip
    return 0


def main():
    sys.exit(train())


def eval_main():
    sys.exit(evaluate_checkpoint())


if __name__ == "__main__":
    main()
