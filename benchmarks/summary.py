"""Turn the session's rows into a markdown table of speedups and a bar chart of throughput."""

from collections import defaultdict


def _groups(rows):
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    return groups


def add_speedups(rows):
    """speedup_vs_<row> = that row's median / this row's median, for each eager row of the same group."""
    for rs in _groups(rows).values():
        base = {r["row"]: r["median_ms"] for r in rs}
        for r in rs:
            for name in ("eager-sdpa", "eager-math", "eager"):
                if name in base:
                    r[f"speedup_vs_{name}"] = base[name] / r["median_ms"]


def _ratio(base, name, ms):
    return f"{base[name] / ms:.2f}x" if name in base else "-"


def speedup_table(rows):
    """One line per row, fastest first within each group; speedups against the group's eager rows."""
    lines = [
        "| group | row | median ms | host ms | items/s | TFLOP/s | MFU | peak GiB | vs eager-sdpa | vs eager-math/eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, rs in _groups(rows).items():
        base = {r["row"]: r["median_ms"] for r in rs}
        plain_eager = "eager-math" if "eager-math" in base else "eager"
        for r in sorted(rs, key=lambda r: r["median_ms"]):
            ms = r["median_ms"]
            tflops = f"{r['tflops']:.1f}" if "tflops" in r else "-"
            mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
            host = f"{r['host_ms']:.2f}" if "host_ms" in r else "-"
            notes = [r["config"]] if "config" in r else []
            notes += _step_choice(r.get("step_choice"))
            name = f"{r['row']} [{'; '.join(notes)}]" if notes else r["row"]
            lines.append(
                f"| {group} | {name} | {ms:.3f} | {host} | {r.get('items_per_s', 0):,.0f} | {tflops} | {mfu} "
                f"| {r.get('peak_mem_gib', 0):.2f} | {_ratio(base, 'eager-sdpa', ms)} | {_ratio(base, plain_eager, ms)} |"
            )
    return "\n".join(lines)


def _step_choice(sc) -> list:
    """A training row's GEMM variant kept and both variants' median steps (its `step_choice`), as a label note."""
    if not isinstance(sc, dict) or "host_counted_ms" not in sc:
        return []
    times = [f"host counted {sc['host_counted_ms']:.2f}"] + (
        [f"GPU time {sc['gpu_time_ms']:.2f}"] if "gpu_time_ms" in sc else []
    )
    return [f"kept {sc['kept']}: {', '.join(times)} ms a step"]


def candidate_table(rows):
    """The GEMM chooser's own side-by-side times (a row's `gemm_ms`: every candidate of a shape, timed on the same
    operands before the row ran), one line per GEMM shape as it was first timed; empty where nothing was timed."""
    lines, seen = [], set()
    for r in rows:
        for key, times in r.get("gemm_ms", {}).items():
            if key in seen:
                continue
            seen.add(key)
            ranked = ", ".join(f"{name} {ms:.4f}" for name, ms in sorted(times.items(), key=lambda t: t[1]))
            lines.append(f"| {r['group']} | {key} | {ranked} |")
    if not lines:
        return ""
    head = "| first timed in | GEMM (kind, M, N, K, ...) | candidates, ms of GPU time, fastest first |\n|---|---|---|\n"
    return head + "\n".join(lines)


def tuned_table(rows):
    """The autotuner's time of every config it timed for a row's kernels (`tuned_ms`), one line per row that has
    them; empty where none has."""
    lines = []
    for r in rows:
        times = r.get("tuned_ms")
        if times:
            ranked = ", ".join(f"{name} {ms:.4f}" for name, ms in sorted(times.items(), key=lambda t: t[1]))
            lines.append(f"| {r['group']} | {r['row']} | {ranked} |")
    if not lines:
        return ""
    return "| group | row | configs, ms of GPU time, fastest first |\n|---|---|---|\n" + "\n".join(lines)


def _plot(rows, path, info=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.2 + 0.42 * len(rows) + 0.6 * len(groups)), squeeze=False)
    for ax, (group, rs) in zip(axes[:, 0], groups.items()):
        rs = sorted(rs, key=lambda r: r.get("items_per_s", 1e3 / r["median_ms"]))
        vals = [r.get("items_per_s", 1e3 / r["median_ms"]) for r in rs]
        colors = ["tab:orange" if r["row"].startswith("ours") else "tab:gray" for r in rs]
        ax.barh([r["row"] for r in rs], vals, color=colors)
        unit = rs[0].get("item_name", "call")
        ax.set_title(f"{group}  ({unit}/s, higher is better)", fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    if info is not None:
        title = f"{info['card']} | torch {info['torch']} | triton {info['triton']} | {info['date']}"
        if not any(r["row"].startswith("ours") for r in rows):
            title += "\nCPU run: eager references only, no 'ours' rows (our kernels are timed on a GPU)"
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(rows, info, out_dir):
    table = speedup_table(rows)
    head = (
        f"card: {info['card']} | torch {info['torch']} | triton {info['triton']} | {info['date']}\n"
        f"command: {info['command']}\n"
    )
    candidates = candidate_table(rows)
    if candidates:
        table += "\n\nThe GEMM chooser's times of each candidate (ops/gemm.py; `gemm_ms` in the rows):\n\n" + candidates
    tuned = tuned_table(rows)
    if tuned:
        table += "\n\nThe autotuner's times of each config (`tuned_ms` in the rows):\n\n" + tuned
    (out_dir / "results.md").write_text(head + "\n" + table + "\n")
    _plot(rows, out_dir / "results.png", info)
    return head + table


if __name__ == "__main__":
    # python benchmarks/summary.py ROWS.jsonl OUT_DIR: the table and chart from rows streamed by FASTVIT_BENCH_ROWS
    import json
    import sys
    from pathlib import Path

    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    if rows:
        first = rows[0]
        info = dict(
            card=first["card"],
            torch=first["torch"],
            triton=first["triton"],
            date=first["date"],
            command=" ".join(sys.argv),
        )
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        print(write_summary(rows, info, out))
