"""`posebert ablation --out DIR`: which pretraining levers make the representation carry pose.

Every variant is the ``demo_cpu`` recipe with some of four levers against appearance
shortcuts switched on, pretrained on the train clips only and scored by retrieval on two
held-out clip sets (the shards' ``val`` and ``test`` splits, whose clips pretraining never
sees; choose them with ``shards synth --val-clips/--test-clips``):

- ``background-mask``: frames multiplied by their foreground mask;
- ``augment``: colour jitter drawn per window and per view;
- ``appearance-swap``: shards rendering every window in two appearances, both as views, so
  the multi-view positives include the same instant in other clothing and background;
- ``span-mask``: masking runs of 3 consecutive frames instead of single frames.

The baseline has all four off; each lever is then added alone, and all four together. Like
``posebert demo``, every step is the printed ``posebert`` command, skipped when its output
exists, so running the ablation again continues. DIR/ablation.json, DIR/ablation.md (one table
per held-out set, with the command of every row) and DIR/ablation.png (the share of the
chance -> oracle gap each variant closes, beside raw pixels).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_shards.manifest import atomic_write_text
from finetune.report import gap_closed, md_table, pyplot, save_figure
from pipelines.demo import FULL_STEPS, QUICK_CLIPS, QUICK_STEPS
from pipelines.stages import Stage, open_record, run_stages

HELDOUT = ("val", "test")
"""The query splits: two disjoint held-out clip sets."""

BASELINE = {"model.backbone.background_mask": "false", "model.mask.span": "1"}
"""demo_cpu with every lever off (the recipe itself has the background mask and span 3)."""

LEVERS: dict[str, dict[str, str]] = {
    "background-mask": {"model.backbone.background_mask": "true"},
    "augment": {"model.augment.brightness": "0.4", "model.augment.contrast": "0.4",
                "model.augment.saturation": "0.4", "model.augment.color_cast": "0.3",
                "model.augment.channel_shuffle": "0.5"},
    "appearance-swap": {},  # the shards, not the config (see pretrain_stage)
    "span-mask": {"model.mask.span": "3"},
}  # fmt: skip

VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    **{f"+{lever}": (lever,) for lever in LEVERS},
    "all": tuple(LEVERS),
}
"""Variant name -> the levers it switches on."""

REFERENCE_ROWS = ("random-init", "raw pixels 16x16", "oracle", "chance")


def parse_variants(text: str | None) -> list[str]:
    if not text:
        return list(VARIANTS)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {', '.join(unknown) or text!r}; "
                         f"choose from {', '.join(VARIANTS)}")  # fmt: skip
    return list(dict.fromkeys(names))


def plan(out: Path, variants: list[str], quick: bool, nproc: int) -> list[Stage]:
    """Shards (plain and appearance-swapped), then per variant: pretrain, export and one
    retrieval per held-out set (sharing one embedding cache)."""
    synth = ["--clips", QUICK_CLIPS, "--views", "2", "--frames", "8", "--size", "64"]
    synth = synth if quick else []
    stages = [Stage("shards", ["shards", "synth", "--out", str(out / "shards"), "--overwrite",
                               *synth], out / "shards" / "test" / "manifest.json")]  # fmt: skip
    if any("appearance-swap" in VARIANTS[v] for v in variants):
        stages.append(Stage("shards-appearance-swap",
                            ["shards", "synth", "--out", str(out / "shards-app"), "--overwrite",
                             "--appearances-per-sample", "2", *synth],
                            out / "shards-app" / "train" / "manifest.json"))  # fmt: skip
    for variant in variants:
        slug = variant.lstrip("+")
        run, encoder = out / slug / "pretrain", out / slug / "encoder"
        stages += [
            pretrain_stage(out, variant, quick, nproc),
            Stage(f"{slug}: export", ["export", "--run", str(run), "--out", str(encoder)],
                  encoder / "model.safetensors"),
        ]  # fmt: skip
        for split in HELDOUT:
            stages.append(Stage(
                f"{slug}: retrieval on {split}",
                ["evaluate", "retrieval", "--encoder", str(encoder), "--shards",
                 str(out / "shards"), "--queries", split, "--out",
                 str(out / slug / f"retrieval-{split}"), "--cache", str(out / "cache")],
                out / slug / f"retrieval-{split}" / "retrieval.json"))  # fmt: skip
    return stages


def overrides(variant: str) -> dict[str, str]:
    """The ``--set`` fields of a variant on top of demo_cpu."""
    sets = dict(BASELINE)
    for lever in VARIANTS[variant]:
        sets.update(LEVERS[lever])
    return sets


def pretrain_stage(out: Path, variant: str, quick: bool, nproc: int) -> Stage:
    swap = "appearance-swap" in VARIANTS[variant]
    shards = out / ("shards-app" if swap else "shards") / "train"
    steps = QUICK_STEPS if quick else FULL_STEPS
    sets = {"data.train": str(shards), "train.max_steps": str(steps)} | overrides(variant)
    if quick:
        sets |= {"data.views": "2", "train.checkpoint_every": str(steps)}
    elif swap:  # 4 of the 8 views (4 cameras x 2 appearances): as many frames per step
        sets["data.views"] = "4"
    run = out / variant.lstrip("+") / "pretrain"
    args = ["pretrain", "--recipe", "demo_cpu", "--out", str(run), "--nproc-per-node", str(nproc)]
    args += [f"--set={key}={value}" for key, value in sets.items()]
    return Stage(f"{variant.lstrip('+')}: pretrain", args, run / "checkpoints" / f"step_{steps}")


def run_ablation(out_dir: str | os.PathLike, variants: str | None = None, quick: bool = False,
                 nproc: int = 2) -> int:  # fmt: skip
    """Run (or continue) every stage, then write DIR/ablation.json, .md and .png."""
    chosen = parse_variants(variants)
    out = Path(out_dir)
    record_path = out / "ablation-run.json"
    settings = {"quick": quick, "nproc": nproc}
    record = open_record(record_path, "an ablation run", settings)
    stages = plan(out, chosen, quick, nproc)
    code = run_stages(stages, "ablation", record, record_path)
    if code:
        return code
    commands = {s.name: "posebert " + " ".join(s.args) for s in stages}
    results = summarize(out, chosen, commands, settings)
    atomic_write_text(out / "ablation.json", json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    atomic_write_text(out / "ablation.md", text)
    plot(results, out / "ablation.png")
    print(text)
    return 0


def _row(r: dict, chance: float, oracle: float) -> dict:
    top1 = r["mpjpe"]["top1"]
    return {"mpjpe_top1": top1, "p_mpjpe_top1": r["p_mpjpe"]["top1"],
            "gap_closed": gap_closed(top1, chance, oracle),
            "probe_mpjpe": r.get("probe", {}).get("mpjpe")}  # fmt: skip


def summarize(out: Path, variants: list[str], commands: dict, settings: dict) -> dict:
    """Per held-out set: the reference rows (from the first variant's run; random-init's input
    follows the background-mask setting, so a variant with the other setting adds its own
    random-init row) and every variant's model row."""
    heldout = {}
    for split in HELDOUT:
        runs = {v: json.loads((out / v.lstrip("+") / f"retrieval-{split}" / "retrieval.json")
                              .read_text()) for v in variants}  # fmt: skip
        first = runs[variants[0]]
        chance = first["rows"]["chance"]["mpjpe"]["top1"]
        oracle = first["rows"]["oracle"]["mpjpe"]["top1"]
        manifest = json.loads((out / "shards" / split / "manifest.json").read_text())
        reference = {name: _row(first["rows"][name], chance, oracle) for name in REFERENCE_ROWS}
        masked = [v for v in variants if "background-mask" in VARIANTS[v]]
        if masked and masked[0] != variants[0]:  # random-init sees masked frames there
            reference["random-init, background mask"] = _row(
                runs[masked[0]]["rows"]["random-init"], chance, oracle)
        heldout[split] = {
            "clips": list(manifest["source"]["clips"]),
            "probe_mean_pose_mpjpe": first["protocol"]["probe_mean_pose_mpjpe"],
            "reference": reference,
            "variants": {v: _row(runs[v]["rows"]["model"], chance, oracle) for v in variants},
        }  # fmt: skip
    return {
        "settings": settings,
        "levers": {v: list(VARIANTS[v]) for v in variants},
        "heldout": heldout,
        "commands": {v: [commands[f"{v.lstrip('+')}: {step}"]
                         for step in ("pretrain", "export", "retrieval on val",
                                      "retrieval on test")] for v in variants},
    }  # fmt: skip


def markdown(results: dict) -> str:
    """One table per held-out set (variants, then the reference rows), then the commands."""
    lines: list[str] = []
    for split, h in results["heldout"].items():
        lines += [f"Held-out set `{split}` (clips {', '.join(h['clips'])}); linear probe "
                  f"floor (mean pose) {h['probe_mean_pose_mpjpe']:.1f} mm", ""]  # fmt: skip
        rows = []
        for name, r in [*h["variants"].items(), *h["reference"].items()]:
            probe = "-" if r["probe_mpjpe"] is None else f"{r['probe_mpjpe']:.1f}"
            rows.append([name, f"{r['mpjpe_top1']:.1f}", f"{r['p_mpjpe_top1']:.1f}",
                         f"{round(r['gap_closed'], 2) + 0.0:.0%}", probe])  # fmt: skip
        lines += md_table(["encoder", "retrieval top-1 MPJPE", "P-MPJPE", "gap closed",
                           "linear probe MPJPE"], rows)  # fmt: skip
        lines.append("")
    lines += ["Commands (after the two `shards synth` runs):", ""]
    for variant, commands in results["commands"].items():
        lines.append(f"- {variant}:")
        lines += [f"  `{c}`" for c in commands]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Gap closed per variant and held-out set, with the raw-pixel and random-init levels."""
    plt = pyplot()
    heldout = results["heldout"]
    variants = list(next(iter(heldout.values()))["variants"])
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(variants) * len(heldout) + 1.5))
    height = 0.8 / len(heldout)
    colours = ("tab:blue", "tab:orange", "tab:green")
    for i, (split, h) in enumerate(heldout.items()):
        ys = [k + i * height for k in range(len(variants))]
        ax.barh(ys, [100 * h["variants"][v]["gap_closed"] for v in variants], height,
                label=f"{split}: {', '.join(h['clips'])}", color=colours[i % 3])  # fmt: skip
        for name, style in (("raw pixels 16x16", "--"), ("random-init", ":")):
            ax.axvline(100 * h["reference"][name]["gap_closed"], color=colours[i % 3],
                       linestyle=style, linewidth=1)  # fmt: skip
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(variants))], variants)
    ax.invert_yaxis()
    ax.set_xlabel("share of the chance -> oracle gap closed by top-1 retrieval (%)\n"
                  "dashed: raw pixels 16x16, dotted: random-init (same colour: same held-out set)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
