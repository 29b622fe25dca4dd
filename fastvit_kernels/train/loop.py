"""The training loop: one epoch of steps, the evaluation, the log, checkpoints and curves after it."""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import GracefulStop, save_checkpoint
from .distributed import all_sum


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
    loss_sum, correct, count = all_sum([loss_sum, correct, count], device, world)
    return loss_sum / max(count, 1), correct / max(count, 1)


def amp_name(device, amp):
    return amp or ("bf16" if device.type == "cuda" else "off")


def autocast(device, amp):
    amp = amp_name(device, amp)
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def plot_curves(log_rows, path):
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


def _fresh_sums():
    return dict(loss=0.0, correct=0.0, count=0.0, data_s=0.0, step_s=0.0)


@dataclass
class Run:
    """Everything one training run holds; the CLI builds it, run() trains, a checkpoint restores it exactly."""

    args: object
    device: torch.device
    rank: int
    world: int
    out: Path
    model: torch.nn.Module  # checkpoints come from here: no DDP or torch.compile prefixes in their keys
    step_model: torch.nn.Module  # what the steps call: the model, wrapped by DDP and/or torch.compile
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: object
    test_loader: object
    steps_per_epoch: int
    model_args: dict
    start_epoch: int = 0
    start_batch: int = 0
    best_acc: float = 0.0
    log_rows: list = field(default_factory=list)
    partial: dict | None = None  # the sums of an epoch interrupted mid-way

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    def state(self, epoch, batch, partial_sums) -> dict:
        return dict(
            model=self.model.state_dict(),
            optimizer=self.opt.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            batch=batch,
            best_acc=self.best_acc,
            log=self.log_rows,
            partial=partial_sums,
            args=vars(self.args),
            model_args=self.model_args,
            preset=self.args.preset,
            rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        )

    def restore(self, ckpt: dict, path: Path) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_batch, self.best_acc = ckpt["epoch"], ckpt["batch"], ckpt["best_acc"]
        self.log_rows, self.partial = ckpt["log"], ckpt.get("partial")
        # RNG states are CPU byte tensors, whatever map_location moved them to
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if self.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), self.device)
        if self.main_rank:  # epochs counted from 1 here as everywhere the user reads them
            print(
                f"resumed from {path}: epoch {self.start_epoch + 1}, batch {self.start_batch}, best "
                f"{100 * self.best_acc:.2f}%"
            )

    def run(self) -> int:
        """Train from start_epoch to args.epochs; 0 when done, 130 when Ctrl-C stopped it (after saving)."""
        epoch, self.resume_at, sums = self.start_epoch, self.start_batch, self.partial
        with GracefulStop(self.device, self.world) as stop:
            try:
                for epoch in range(self.start_epoch, self.args.epochs):
                    resumed = epoch == self.start_epoch
                    sums = self.partial if (resumed and self.partial) else _fresh_sums()
                    self.train_epoch(epoch, self.start_batch if resumed else 0, sums, stop)
                    self.end_epoch(epoch, sums)
            except KeyboardInterrupt:
                if self.main_rank:
                    save_checkpoint(self.out / "last.pt", self.state(epoch, self.resume_at, sums))
                    print(
                        f"interrupted: saved {self.out / 'last.pt'} at epoch {epoch + 1}, batch {self.resume_at}; "
                        "--resume continues there",
                        flush=True,
                    )
                self._close()
                return 130
        if self.main_rank and self.log_rows:
            last = self.log_rows[-1]
            print(
                f"done: {len(self.log_rows)} epochs, final test accuracy {100 * last['test_acc']:.2f}%, best "
                f"{100 * self.best_acc:.2f}%, {last['img_per_s']:,.0f} img/s; "
                f"{self.out}/{{last.pt,best.pt,log.jsonl,curves.png}}"
            )
        self._close()
        return 0

    def train_epoch(self, epoch, first, sums, stop) -> None:
        args, amp = self.args, autocast(self.device, self.args.amp)
        self.model.train()
        self.train_loader.epoch = epoch
        order = self.train_loader._indices()
        bar = tqdm(
            range(first, self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            leave=False,
            disable=args.no_progress or not self.main_rank,
            dynamic_ncols=True,
        )
        for i in bar:
            self.resume_at = i  # until this batch completes, a hard stop resumes at it
            t0 = time.perf_counter()
            x, y = self.train_loader.batch(order, i)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = lr_at(epoch * self.steps_per_epoch + i, args, self.steps_per_epoch)
            with amp:
                logits = self.step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
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
            self.resume_at = i + 1
            if stop.should_stop():
                raise KeyboardInterrupt

    def end_epoch(self, epoch, sums) -> None:
        """Evaluate, then log, checkpoint and plot on the main rank."""
        world = self.world
        keys = ("loss", "correct", "count", "data_s", "step_s")
        loss_sum, correct, count, data_s, step_s = all_sum([sums[k] for k in keys], self.device, world)
        amp = autocast(self.device, self.args.amp)
        test_loss, test_acc = evaluate(self.step_model, self.test_loader, amp, self.device, world)
        row = dict(
            epoch=epoch + 1,
            train_loss=loss_sum / count,
            train_acc=correct / count,
            test_loss=test_loss,
            test_acc=test_acc,
            lr=self.opt.param_groups[0]["lr"],
            img_per_s=count / ((data_s + step_s) / world),
            data_s=data_s / world,
            step_s=step_s / world,
        )
        self.log_rows.append(row)
        improved = test_acc > self.best_acc
        self.best_acc = max(self.best_acc, test_acc)
        if not self.main_rank:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}% | test loss "
            f"{test_loss:.4f} acc {100 * test_acc:.2f}% | {row['img_per_s']:,.0f} img/s (data {data_s / world:.1f}s, "
            f"step {step_s / world:.1f}s)",
            flush=True,
        )
        save_checkpoint(self.out / "last.pt", self.state(epoch + 1, 0, None))
        if improved:
            save_checkpoint(self.out / "best.pt", self.state(epoch + 1, 0, None))
        plot_curves(self.log_rows, self.out / "curves.png")  # every epoch: an interrupted run has its curves too

    def _close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()
