"""fastvit-train and fastvit-eval as a user runs them: through the installed entry points, in a subprocess.

User errors end with one `error:` line and a non-zero exit, never a traceback, and leave no empty out-dir behind.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cifar_fixture import TINY, write_cifar10

ROOT = Path(__file__).parent.parent
ENTRY = {"fastvit-train": "main", "fastvit-eval": "eval_main"}


def _run(name, *args, env=None):
    exe = Path(sys.executable).parent / name
    cmd = (
        [str(exe)]
        if exe.is_file()
        else [sys.executable, "-c", f"from fastvit_kernels.train import {ENTRY[name]}; {ENTRY[name]}()"]
    )
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)


def _train_args(data, out, *extra):
    return [
        "--data-dir",
        data,
        "--out-dir",
        out,
        "--batch-size",
        "20",
        "--amp",
        "off",
        "--backend",
        "torch",
        "--no-progress",
        "--warmup-epochs",
        "0.5",
        *extra,
    ]


def _assert_user_error(proc, *words):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") or ": error:" in last, proc.stderr[-2000:]
    for w in words:
        assert w in last, last


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def test_resume_takes_the_model_and_recipe_from_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    first = _run("fastvit-train", *_train_args(data, out, "--epochs", "1", "--lr", "2e-3", *TINY))
    assert first.returncode == 0, first.stderr[-3000:]
    # the start-up line: what runs where, on how much data
    assert (
        "fastvit-train: vit_cifar10" in first.stdout
        and f"parameters) on {'cuda' if torch.cuda.is_available() else 'cpu'}" in first.stdout
        and "eager PyTorch, autocast off" in first.stdout
        and "100 training and 40 test images" in first.stdout
    )
    again = _run("fastvit-train", "--resume", "--out-dir", out, "--data-dir", data, "--epochs", "2", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["args"]["lr"] == 2e-3 and ckpt["model_args"]["depth"] == 1
    clash = _run(
        "fastvit-train",
        "--resume",
        "--out-dir",
        out,
        "--data-dir",
        data,
        "--epochs",
        "3",
        "--lr",
        "0.5",
        "--model-arg",
        "depth=2",
    )
    _assert_user_error(clash, "--lr 0.5 (the run has 0.002)", "--model-arg depth=2")


def test_model_arg_takes_python_spellings(data, tmp_path):
    out = tmp_path / "run"
    proc = _run("fastvit-train", *_train_args(data, out, "--epochs", "1", *TINY, "--model-arg", "qkv_bias=False"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["model_args"]["qkv_bias"] is False and "blocks.0.attn.qkv.bias" not in ckpt["model"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model-arg", "bogus=3"], ["bogus", "no such parameter"]),
        (["--model-arg", "depth=abc"], ["depth must be an int, got 'abc'"]),
        (["--model-arg", "dim=-8"], ["dim must be positive"]),
        (["--model-arg", "depth=2", "--model-arg", "depth=3"], ["depth given twice"]),
        (["--model-arg", "backend=triton"], ["--backend"]),
    ],
    ids=["unknown-key", "not-an-int", "negative", "twice", "backend"],
)
def test_bad_model_args_are_one_line_errors_and_leave_no_out_dir(data, tmp_path, extra, words):
    out = tmp_path / "never"
    _assert_user_error(_run("fastvit-train", *_train_args(data, out, *extra)), *words)
    assert not out.exists()


def test_out_dir_that_is_a_file_or_below_one(data, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    _assert_user_error(_run("fastvit-train", *_train_args(data, f)), "is a file")
    _assert_user_error(_run("fastvit-train", *_train_args(data, f / "below")), "is a file")


def test_missing_data_and_failed_download_leave_no_out_dir(tmp_path):
    out = tmp_path / "never"
    _assert_user_error(_run("fastvit-train", *_train_args(tmp_path / "nothing", out)), "CIFAR-10 not found")
    offline = dict(
        os.environ,
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    proc = _run("fastvit-train", *_train_args(tmp_path / "dl", out, "--download"), env=offline)
    _assert_user_error(proc, "could not download CIFAR-10", "cifar-10-batches-py")
    assert not out.exists()


def test_eval_refuses_missing_and_foreign_files(data, tmp_path):
    _assert_user_error(_run("fastvit-eval", tmp_path / "nope.pt", "--data-dir", data), "no such checkpoint")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    _assert_user_error(_run("fastvit-eval", text, "--data-dir", data), "not a checkpoint torch can read")
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    _assert_user_error(_run("fastvit-eval", other, "--data-dir", data), "not a fastvit-train checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_backend_triton_without_a_gpu(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _run("fastvit-train", *_train_args(data, tmp_path / "never", "--backend", "triton"), env=env)
    _assert_user_error(proc, "--backend triton needs a CUDA GPU")


def test_help_shows_defaults():
    proc = _run("fastvit-train", "--help")
    assert proc.returncode == 0 and "(default: 512)" in proc.stdout and "(default: 0.001)" in proc.stdout
