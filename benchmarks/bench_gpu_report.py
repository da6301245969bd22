"""The GPU check's report: machine and versions, goals, MFU, and the markdown table.

Pure functions of the results dict that ``bench_gpu.py`` fills section by section, so a
partial check (a section failed, skipped or never reached) still reports every goal, with the
reason it has no value.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

PACKAGES = ("torch", "torchvision", "deepspeed", "timm", "transformers", "accelerate",
            "webdataset", "pydantic", "numpy", "pytest")  # fmt: skip
PEAKS = (
    ("H100 PCIe", 756e12, "H100 PCIe datasheet, bf16 dense"),
    ("H100 NVL", 835e12, "H100 NVL datasheet, bf16 dense"),
    ("H100", 989.4e12, "H100 SXM datasheet, bf16 dense"),
    ("H200", 989.4e12, "H200 datasheet (the H100 SXM's chip), bf16 dense"),
    ("A100", 312e12, "A100 datasheet, bf16 dense"),
)
"""Card-name substring -> peak FLOP/s the MFU is divided by (first match wins)."""
RUNS = (("plain", "plain torch loop", "synthetic_{px}", "plain"),
        ("deepspeed", "DeepSpeed engine", "synthetic_{px}", "deepspeed"),
        ("e2e_cpu", "end to end, CPU decoding", "e2e_cpu_{px}", None),
        ("e2e_gpu", "end to end, GPU decoding", "e2e_gpu_{px}", None))  # fmt: skip
"""Every frames/s figure: key, label, section, run inside the section."""


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return out


def machine(device: str, tiny: bool) -> dict:
    out = dict(host=platform.node(), cpus=os.cpu_count(), device=device, tiny=tiny,
               processor=platform.processor() or platform.machine(), card=None)  # fmt: skip
    if device != "cuda":
        return out
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()[0]  # fmt: skip
        out["card"], out["memory"], out["driver"] = (p.strip() for p in line.split(","))
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        import torch  # no nvidia-smi: ask the runtime (this process then holds a context)

        out["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def peak(card: str | None) -> tuple[float | None, str]:
    for needle, flops, source in PEAKS:
        if card and needle in card:
            return flops, f"{flops / 1e12:.1f} TFLOP/s ({source})"
    return None, f"no datasheet peak known for {card or 'this device'}: MFU not computed"


# ----------------------------------------------------------------------------- derived figures


def _why(sections: dict, name: str) -> str:
    s = sections.get(name)
    if s is None:
        return f"{name} is not in this run"
    return f"{name} {s.get('status')}: {s.get('reason') or 'no figure'}"


def fps(sections: dict, section: str, run: str | None) -> tuple[float | None, str | None]:
    """A frames/s figure, or None and why it is missing."""
    s = sections.get(section, {})
    part = (s.get(run) or {}) if run else s
    if part.get("frames_per_s"):  # a section that failed in its other run still has this one
        return float(part["frames_per_s"]), None
    return None, part.get("error") or _why(sections, section)


def _goal(goal: str, value: float | None, kind: str, target: str, met: bool | None,
          reason: str | None) -> dict:  # fmt: skip
    return dict(goal=goal, value=value, kind=kind, target=target, met=met,
                reason=reason if value is None or met is None else None)  # fmt: skip


def _size_goals(sections: dict, px: int) -> list[dict]:
    plain, why_plain = fps(sections, f"synthetic_{px}", "plain")
    ds, why_ds = fps(sections, f"synthetic_{px}", "deepspeed")
    over = plain / ds - 1 if plain and ds else None
    goals = [_goal(f"DeepSpeed overhead (engine vs plain loop, synthetic), {px} px", over,
                   "percent", "<= 5%", None if over is None else over <= 0.05,
                   why_plain or why_ds)]  # fmt: skip
    for decode in ("cpu", "gpu"):
        e2e, why_e2e = fps(sections, f"e2e_{decode}_{px}", None)
        ratio = e2e / ds if e2e and ds else None
        goals.append(_goal(f"end to end ({decode.upper()} decoding) / synthetic (DeepSpeed), "
                           f"{px} px", ratio, "ratio", ">= 0.9",
                           None if ratio is None else ratio >= 0.9, why_e2e or why_ds))  # fmt: skip
    return goals


def goals(results: dict) -> list[dict]:
    sections, sizes = results["sections"], results["settings"]["sizes"]
    out = [g for px in sizes for g in _size_goals(sections, px)]
    if 224 in sizes:
        e2e, why = fps(sections, "e2e_gpu_224", None)
    else:
        e2e, why = None, f"224 px is not among this run's sizes {sizes}"
    out.append(_goal("end to end with GPU decoding, 224 px, frames/s per GPU", e2e, "fps",
                     ">= 6,000", None if e2e is None else e2e >= 6000, why))  # fmt: skip
    s = sections.get("search", {})
    seconds = s.get("search_s") if s.get("status") == "ok" else None
    full = (s.get("n"), s.get("d")) == (1_000_000, 256)
    met = None if seconds is None or not full else seconds < 30
    why = _why(sections, "search")
    if seconds is not None and not full:
        why = (
            f"measured at {s.get('n')} x {s.get('n')} x {s.get('d')}; the goal is for 1M x 1M x 256"
        )
    out.append(_goal(f"top-1 search {s.get('n', 1_000_000):,} x {s.get('n', 1_000_000):,} x "
                     f"{s.get('d', 256)}, seconds", seconds, "seconds", "< 30", met,
                     why))  # fmt: skip
    return out


def mfu(results: dict) -> list[dict]:
    """MFU of the backbone: frames/s x its forward + backward FLOPs per frame / peak."""
    sections = results["sections"]
    flops = sections.get("flops", {})
    top, _ = peak(results["machine"].get("card"))
    matmul = sections.get("search", {}).get("matmul_flops")
    out = []
    for px in results["settings"]["sizes"]:
        per_frame = (flops.get(str(px)) or {}).get("train")
        for key, label, section, run in RUNS:
            value, why = fps(sections, section.format(px=px), run)
            achieved = value * per_frame if value and per_frame else None
            out.append(dict(px=px, run=key, label=label, frames_per_s=value,
                            train_flops_per_frame=per_frame, achieved_flops=achieved,
                            mfu=achieved / top if achieved and top else None,
                            mfu_vs_matmul=achieved / matmul if achieved and matmul else None,
                            reason=why if value is None else None))  # fmt: skip
    return out


def derive(results: dict) -> None:
    """Fill ``goals``, ``mfu`` and the MFU denominator from the sections measured so far."""
    top, source = peak(results["machine"].get("card"))
    results["peak"] = dict(flops=top, source=source,
                           measured_matmul_flops=results["sections"].get("search", {})
                           .get("matmul_flops"))  # fmt: skip
    results["goals"] = goals(results)
    results["mfu"] = mfu(results)


# ------------------------------------------------------------------------------------ markdown


def fmt(value: float | None, kind: str = "fps") -> str:
    if value is None:
        return "-"
    return {"fps": f"{value:,.0f}", "ratio": f"{value:.2f}", "percent": f"{value:+.1%}",
            "seconds": f"{value:.2f} s", "share": f"{value:.1%}"}[kind]  # fmt: skip


def _head(results: dict) -> list[str]:
    m, v, st = results["machine"], results["versions"], results["settings"]
    card = m.get("card") or f"no GPU ({m['processor']}, {m['cpus']} cores)"
    title = card + (" - tiny CPU run: it tests the script, not the hardware" if m["tiny"] else "")
    lines = [f"# GPU check: {title}", "",
             f"- Date: {results['started']} to {results['finished'] or '(did not finish)'}",
             f"- Machine: {m['host']}, {m['cpus']} CPU cores" +
             (f", {m.get('memory')}, driver {m.get('driver')}" if m.get("memory") else ""),
             "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- Recipe `{st['recipe']}`, {st['workers']} loader workers; MFU divided by "
             f"{results['peak']['source']}"]  # fmt: skip
    for px, run in sorted(st.get("runs", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"- {px} px: batch {run['batch']} (windows) x {run['views']} views x "
                     f"{run['frames']} frames = {run['frames_per_step']:,} frames per step; the "
                     f"split's {run['samples']} samples listed {run['listed']}x per "
                     "epoch")  # fmt: skip
    return lines


def _goals_table(results: dict) -> list[str]:
    lines = ["", "## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for g in results["goals"]:
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        value = fmt(g["value"], g["kind"]) if g["value"] is not None else f"- ({g['reason']})"
        if g["value"] is not None and g.get("reason"):
            met += f" ({g['reason']})"
        lines.append(f"| {g['goal']} | {value} | {g['target']} | {met} |")
    return lines


def _throughput_tables(results: dict) -> list[str]:
    lines = ["", "## Throughput (frames/s per device) and MFU of the ResNet-50 part", "",
             "| px | run | frames/s | GFLOP per training frame | MFU (datasheet) | "
             "MFU (measured matmul rate) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["mfu"]:
        per = row["train_flops_per_frame"]
        value = fmt(row["frames_per_s"]) if row["frames_per_s"] else f"- ({row['reason']})"
        gflop = f"{per / 1e9:.2f}" if per else "-"
        lines.append(
            f"| {row['px']} | {row['label']} | {value} | {gflop} | "
            f"{fmt(row['mfu'], 'share')} | {fmt(row['mfu_vs_matmul'], 'share')} |"
        )
    matmul = results["peak"].get("measured_matmul_flops")
    if matmul:
        lines.append(f"\nMeasured bf16 matrix-product rate: {matmul / 1e12:,.3g} TFLOP/s.")
    return lines


def _details_table(results: dict) -> list[str]:
    """How each frames/s figure was taken: steps timed, median, halves, memory."""
    lines = ["", "## How the figures were taken", "",
             "| section | run | steps timed | frames/s (mean) | median step | first half | "
             "second half | note |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in results["sections"].items():
        if name.startswith("synthetic_"):
            for run in ("plain", "deepspeed"):
                r = s.get(run) or {}
                if r.get("steps"):
                    memory = s.get("max_memory_gib")
                    note = f"peak memory {memory:.1f} GiB" if memory else ""
                    lines.append(f"| {name} | {run} | {r['steps']} | {fmt(r['frames_per_s'])} "
                                 f"| {fmt(r.get('median_frames_per_s'))} | - | - | "
                                 f"{note} |")  # fmt: skip
        elif name.startswith("e2e_") and s.get("steps"):
            note = (f"after {s.get('warmup')} warm-up steps; at most "
                    f"{s.get('prefetch_share_at_most', 0):.0%} of the timed batches could have "
                    "been prefetched before the window")  # fmt: skip
            lines.append(f"| {name} | posebert pretrain | {s['steps']} | "
                         f"{fmt(s['frames_per_s'])} | {fmt(s.get('median_frames_per_s'))} | "
                         f"{fmt(s.get('first_half_frames_per_s'))} | "
                         f"{fmt(s.get('second_half_frames_per_s'))} | {note} |")  # fmt: skip
    return lines


def _search_and_tests(results: dict) -> list[str]:
    s, t = results["sections"].get("search", {}), results["sections"].get("gpu_tests", {})
    lines = ["", "## Top-1 search", ""]
    if s.get("status") == "ok":
        c = s.get("check", {})
        runs = ", ".join(f"{x:.2f}" for x in s.get("all_search_s", []))
        lines += ["| N x N x d | dtype | blocks | seconds (best) | all runs | top-1 equal to "
                  "float64 (sample) | worst relative excess |", "|---|---|---|---|---|---|---|",
                  f"| {s.get('n', 0):,} x {s.get('n', 0):,} x {s.get('d')} | {s.get('dtype')} | "
                  f"{s.get('qblock')} x {s.get('gblock')} | {s['search_s']:.2f} | {runs} | "
                  f"{fmt(c.get('top1_equal'), 'share')} of {c.get('checked', 0)} | "
                  f"{c.get('worst_relative_excess', 0):.2e} |"]  # fmt: skip
    else:
        lines.append(f"Not measured: {_why(results['sections'], 'search')}")
    lines += ["", "## GPU tests", "",
              f"`{t.get('command', 'pytest -m gpu -q tests/gpu')}`: {t.get('status')}"
              + (f", {t['summary']}" if t.get("summary") else "")
              + (f" ({t['reason']})" if t.get("reason") else "")]  # fmt: skip
    return lines


def _sections_table(results: dict) -> list[str]:
    lines = ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, s in results["sections"].items():
        note = s.get("reason") or ""
        if s.get("status") == "ok" and s.get("ended") == "stopped":
            note = "stopped once enough steps were timed"
        lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '-')} | "
                     f"{note.replace('|', '/')} |")  # fmt: skip
    return lines


def markdown(results: dict) -> str:
    parts = (_head(results) + _goals_table(results) + _throughput_tables(results)
             + _details_table(results) + _search_and_tests(results)
             + _sections_table(results))  # fmt: skip
    return "\n".join(parts) + "\n"
