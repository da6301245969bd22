"""`posebert demo --out DIR`: the whole pipeline on the embedded data, ending in one table.

Stages, each the ``posebert`` command a user would type (printed before it runs), each skipped
when its output is already there, so running the demo again continues where it stopped:

1. ``shards synth``: the embedded real-motion shards (all clips; ``--quick``: four clips, 2 views),
   and the same clips with every window in two appearances (``--appearances-per-sample 2``);
2. ``pretrain --recipe demo_cpu --levers ... --nproc-per-node 2``: DeepSpeed, two processes
   (resumes), with the levers of the ablation's best variant
   (:data:`pretrain.recipes.BEST_LEVERS`) on the appearance-swapped train split;
3. ``export``: the encoder as safetensors + config;
4. ``evaluate retrieval``: the model beside random-init, raw pixels, oracle and chance;
5. ``finetune pose``: probe and full fine-tune at 10% and 100% labels, pretrained vs random-init;
6. ``finetune future``: Pose-GPT beside zero- and constant-velocity baselines;
7. ``shards detect``: the 2D detector (BlazePose) over every frame of the shards;
8. ``finetune lift --method tcn --rows rf27 --input detected``: the VideoPose3D TCN trained on
   those detections;
9. ``shards render-video dance_b``: a held-out clip as an ordinary H.264 video (640x360, 50 fps,
   photo background) with its ground truth;
10. ``predict``: that video through detection, tracking and the TCN, scored against the truth
    (MPJPE and P-MPJPE over the frames where the person was found) beside the mean train pose.

DIR/results.json gathers the figures and DIR/results.md shows them in one table, with the time
each stage took.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.report import gap_closed, write_stage
from finetune.report.cli import write_report
from pipelines import chain
from pipelines.stages import Stage, open_record, print_plan, run_stages
from pretrain.recipes import BEST_LEVERS

QUICK_CLIPS = "walk,jump,run,dance_b"  # train walk, jump; val run; test dance_b
QUICK_SYNTH = ("--clips", QUICK_CLIPS, "--views", "2", "--frames", "8", "--size", "64")
"""``shards synth`` flags of the quick runs: four clips, two views, 64 px."""
VIDEO_CLIP = "dance_b"
"""The held-out (test) clip the demo renders as a video and predicts."""
QUICK_VIDEO = ("size=[640,360]", "fps=25", "max_frames=40")
QUICK_LIFT = ("steps=100", "channels=64")
"""The quick runs' video (40 frames) and lifter (fewer steps, narrower)."""


def synth_stage(shards: Path, quick: bool, *extra: str, name: str = "shards") -> Stage:
    args = ["shards", "synth", "--out", str(shards), "--overwrite", *extra]
    return Stage(name, args + list(QUICK_SYNTH if quick else ()), shards / "test" / "manifest.json")


SHARD_LEVERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "appearance-swap": ("app", ("--appearances-per-sample", "2")),
    "motion-augment": ("motion", ("--mirror", "--speeds", "0.8,1.25")),
}
"""Levers that are shards: name -> (folder tag, ``shards synth`` flags). appearance-swap
renders every window in two appearances as extra views (positives across clothing);
motion-augment adds mirrored and 0.8x / 1.25x time-warped copies of the train clips."""


def train_shards(out: Path, levers: tuple[str, ...]) -> tuple[Path, tuple[str, ...]]:
    """The shard root pretraining reads for these levers (OUT/shards, or e.g. OUT/shards-app)
    and the synth flags that make it."""
    on = [SHARD_LEVERS[name] for name in SHARD_LEVERS if name in levers]
    if not on:
        return out / "shards", ()
    return (out / "-".join(["shards", *(tag for tag, _ in on)]),
            tuple(flag for _, flags in on for flag in flags))  # fmt: skip


def train_synth_stage(out: Path, levers: tuple[str, ...], quick: bool) -> Stage | None:
    """The ``shards synth`` of :func:`train_shards` (None when the plain shards serve)."""
    root, flags = train_shards(out, levers)
    if not flags:
        return None
    names = [name for name in SHARD_LEVERS if name in levers]
    return synth_stage(root, quick, *flags, name="shards-" + "+".join(names))


def pretrain_recipe(quick: bool) -> tuple[str, int]:
    """The demo's pretraining recipe and its last step."""
    from pretrain.recipes import get_recipe

    name = "demo_cpu_quick" if quick else "demo_cpu"
    return name, get_recipe(name).train.max_steps


def lever_chain(out: Path, run_out: Path, levers: tuple[str, ...], quick: bool, nproc: int,
                steps: int | None = None, **fields) -> chain.Chain:  # fmt: skip
    """The demo's recipe with exactly these levers on (for ``steps`` steps: None, the
    recipe's), evaluated on OUT/shards, pretrained on :func:`train_shards`; with
    appearance-swap it draws 4 of the 8 views (as many frames per step as without it)."""
    recipe, recipe_steps = pretrain_recipe(quick)
    swap = "appearance-swap" in levers
    sets = ("data.views=4",) if swap and not quick else ()
    if steps is not None and steps != recipe_steps:
        sets += (f"train.max_steps={steps}",)
    steps = steps or recipe_steps
    return chain.Chain(out / "shards", run_out, recipe=recipe,
                       levers=",".join(levers) or "none", pretrain_sets=sets, max_steps=steps,
                       nproc=nproc, train_split=train_shards(out, levers)[0] / "train",
                       **fields)  # fmt: skip


def plan(out: Path, quick: bool, nproc: int, levers: tuple[str, ...] = BEST_LEVERS
         ) -> list[Stage]:  # fmt: skip
    """Shards (and the pretraining's own when a lever is shards), the chain pretrained
    with ``levers`` (default: the ablation's best variant), then the video chain."""
    c = lever_chain(out, out, levers, quick, nproc, pose_recipe="quick" if quick else "demo",
                    future_recipe="quick" if quick else "default")  # fmt: skip
    v = chain.VideoChain(c.shards, out, clip=VIDEO_CLIP, workers=nproc,
                         **({"video_sets": QUICK_VIDEO, "lift_sets": QUICK_LIFT} if quick
                            else {}))  # fmt: skip
    extra = train_synth_stage(out, levers, quick)
    shards = [synth_stage(c.shards, quick), *([extra] if extra else [])]
    return [*shards, *chain.full(c), *chain.video(v)]


def run_demo(out_dir: str | os.PathLike, quick: bool = False, nproc: int = 2,
             dry_run: bool = False) -> int:  # fmt: skip
    """Run (or continue) every stage, then write DIR/results.json and DIR/results.md; with
    ``dry_run``, print the commands and run nothing."""
    out = Path(out_dir)
    stages = plan(out, quick, nproc)
    if dry_run:
        return print_plan(stages, "demo")
    record_path = out / "demo.json"
    settings = {"quick": quick, "nproc": nproc, "levers": list(BEST_LEVERS)}
    record = open_record(record_path, "a demo run", settings)
    code = run_stages(stages, "demo", record, record_path)
    if code:
        return code
    results = summarize(out, record)
    text = results_markdown(results)
    write_stage(out, "results", results, text)
    write_report([out], out)  # OUT/report.html: every table, curve and picture, one page
    print(text)
    return 0


def summarize(out: Path, record: dict) -> dict:
    """The figures of every stage's JSON, in one dict."""
    retrieval = json.loads((out / "retrieval" / "retrieval.json").read_text())
    pose = json.loads((out / "pose" / "pose.json").read_text())
    future = json.loads((out / "future" / "future.json").read_text())
    video = json.loads((out / "predict" / f"{VIDEO_CLIP}.json").read_text())
    rows = retrieval["rows"]
    chance, oracle = rows["chance"]["mpjpe"]["top1"], rows["oracle"]["mpjpe"]["top1"]
    return {
        "settings": record["settings"],
        "stages": record["stages"],
        "retrieval": {
            name: {"mpjpe_top1": r["mpjpe"]["top1"], "p_mpjpe_top1": r["p_mpjpe"]["top1"],
                   "gap_closed": gap_closed(r["mpjpe"]["top1"], chance, oracle),
                   "probe_mpjpe": r.get("probe", {}).get("mpjpe")}
            for name, r in rows.items()
        },
        "pose": [{k: r[k] for k in ("encoder", "mode", "labels", "labelled_windows")}
                 | {m: r["all"][m] for m in ("mpjpe", "p_mpjpe", "n_mpjpe", "mpjve")}
                 for r in pose["rows"]],
        "future": {"horizons_ms": future["protocol"]["horizons_ms"], "rows": future["rows"]},
        "video": video_figures(video),
        "protocol": {"retrieval": retrieval["protocol"], "pose": pose["protocol"],
                      "future": future["protocol"], "video": video["truth"]["protocol"]},
    }  # fmt: skip


def video_figures(summary: dict) -> dict:
    """The figures of ``posebert predict``'s summary of the demo's video."""
    truth = summary["truth"]
    lifter = summary["lifter"]
    return {"clip": VIDEO_CLIP, "frames": summary["frames"],
            "size": summary["image_size"], "fps": summary["fps"],
            "detection_rate": summary["detection_rate"], "frames_scored": truth["frames_scored"],
            "lifter": f"{lifter.get('method', lifter['kind'])} {lifter.get('row', '')}".strip(),
            "mpjpe": truth["mpjpe"], "p_mpjpe": truth["p_mpjpe"],
            "mean_pose": truth["mean_pose"], "detector_2d_px": truth.get("detector_2d_px"),
            "frames_per_second": summary["frames_per_second"]}  # fmt: skip


def _mm(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def video_rows(v: dict) -> list[str]:
    """The video's rows: the lifter on the detector's 2D, and the mean-pose floor."""
    task = f"video 3D ({v['clip']}, {v['size'][0]}x{v['size'][1]}, {v['fps']:g} fps)"
    note = (f"person found in {v['detection_rate']:.0%} of {v['frames']} frames, "
            f"{v['frames_scored']} scored")  # fmt: skip
    if v.get("detector_2d_px"):
        note += f"; detector 2D median {v['detector_2d_px']['median']:.0f} px"
    rows = [f"| {task} | {v['lifter']}, trained on detected 2D | {_mm(v['mpjpe'])} | "
            f"{_mm(v['p_mpjpe'])} | {note} |"]  # fmt: skip
    if v["mean_pose"]:
        rows.append(f"| {task} | mean pose | {_mm(v['mean_pose']['mpjpe'])} | "
                    f"{_mm(v['mean_pose']['p_mpjpe'])} | the mean train pose, same frames |")
    return rows


def results_markdown(results: dict) -> str:
    """One table: retrieval rows, pose-head rows, forecast rows; then the stage times."""
    levers = results["settings"].get("levers") or ["none"]
    lines = [f"Pretraining levers on: {', '.join(levers)} (the ablation's best variant).", "",
             "| task | method | MPJPE (mm) | P-MPJPE (mm) | note |", "|---|---|---|---|---|"]
    for name, r in results["retrieval"].items():
        probe = "" if r["probe_mpjpe"] is None else f"; linear probe {r['probe_mpjpe']:.1f} mm"
        lines.append(f"| retrieval top-1 | {name} | {r['mpjpe_top1']:.1f} | "
                     f"{r['p_mpjpe_top1']:.1f} | {r['gap_closed']:.0%} of the chance -> "
                     f"oracle gap{probe} |")  # fmt: skip
    for r in results["pose"]:
        task = "pose head"
        if r["mode"] != "-":
            task += f", {r['mode']}, {r['labels']:.0%} labels"
        lines.append(f"| {task} | {r['encoder']} | {r['mpjpe']:.1f} | {r['p_mpjpe']:.1f} | "
                     f"MPJVE {r['mpjve']:.1f} mm/frame |")  # fmt: skip
    horizons = results["future"]["horizons_ms"]
    for name, r in results["future"]["rows"].items():
        errors = r["all"]  # pooled over the held-out splits
        shown = ", ".join(f"{h} ms {errors[str(h)]:.0f}" for h in horizons
                          if errors.get(str(h)) is not None)  # fmt: skip
        last = next((h for h in reversed(horizons) if errors.get(str(h)) is not None), None)
        value = f"{errors[str(last)]:.1f}" if last is not None else "n/a"
        lines.append(f"| forecast at {last} ms | {name} | {value} | - | {shown} |")
    lines += video_rows(results["video"])
    lines += ["", "| stage | seconds | command |", "|---|---|---|"]
    for name, s in results["stages"].items():
        lines.append(f"| {name} | {s['seconds']:.0f} | `{s['command']}` |")
    return "\n".join(lines) + "\n"
