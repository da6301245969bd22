"""`posebert ablation --out DIR`: which pretraining levers make the representation carry pose.

Every variant is the ``demo_cpu`` recipe with some of four levers against appearance
shortcuts switched on, pretrained on the train clips only and scored by retrieval on two
held-out clip sets (the shards' ``val`` and ``test`` splits, whose clips pretraining never
sees; choose them with ``shards synth --val-clips/--test-clips``):

- ``background-mask``: frames multiplied by their foreground mask;
- ``augment``: colour jitter drawn per window and per view;
- ``appearance-swap``: shards rendering every window in two appearances, both as views, so
  the multi-view positives include the same instant in other clothing and background;
- ``span-mask``: masking runs of 3 consecutive frames instead of single frames;
- ``same-window-negatives``: half the distractors from the anchor's own window (the same
  clothing and background, other poses beyond the threshold);
- ``motion-augment`` (not against appearance: more motion): shards with mirrored and 0.8x /
  1.25x time-warped copies of the train clips;
- ``frame-contrast``: a second, frame-level term: every frame (not only the masked ones) must
  pick the same instant in the other views among the distractors.

The baseline has every lever off; each lever is then added alone; ``all`` has the first four
on (the demo's pretraining), ``all+same-window-negatives``, ``all+motion-augment`` and
``all+frame-contrast`` add one more. Like
``posebert demo``, every step is the printed ``posebert`` command, skipped when its output
exists, so running the ablation again continues. DIR/ablation.json, DIR/ablation.md (one table
per held-out set, with the command of every row) and DIR/ablation.png (the share of the
chance -> oracle gap each variant closes, beside raw pixels).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from finetune.report import gap_closed, md_table, pyplot, write_stage
from finetune.report.cli import write_report
from pipelines import chain
from pipelines.demo import lever_chain, pretrain_recipe, synth_stage, train_synth_stage
from pipelines.stages import Stage, open_record, print_plan, run_stages
from pretrain.recipes import BEST_LEVERS
from pretrain.recipes import LEVERS as RECIPE_LEVERS

HELDOUT = ("val", "test")
"""The query splits: two disjoint held-out clip sets."""

LEVERS = tuple(RECIPE_LEVERS)
"""The levers against appearance shortcuts (:data:`pretrain.recipes.LEVERS`)."""

APPEARANCE_LEVERS = (*BEST_LEVERS, "same-window-negatives")
"""The levers against appearance shortcuts."""

VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    **{f"+{lever}": (lever,) for lever in APPEARANCE_LEVERS},
    "all": BEST_LEVERS,
    "all+same-window-negatives": (*BEST_LEVERS, "same-window-negatives"),
    "+motion-augment": ("motion-augment",),
    "all+motion-augment": (*BEST_LEVERS, "motion-augment"),
    "all+frame-contrast": (*BEST_LEVERS, "frame-contrast"),
    # the seed's comparison: negatives x background mask, and the quantizer
    "gt_pose": (),
    "gt_pose+mask": ("background-mask",),
    "uniform": ("uniform-negatives",),
    "uniform+mask": ("uniform-negatives", "background-mask"),
    "cosine": ("cosine-negatives",),
    "cosine+mask": ("cosine-negatives", "background-mask"),
    "gt_pose+mask+quantizer": ("background-mask", "quantizer"),
}
"""Variant name -> the switches it turns on (:data:`pretrain.recipes.LEVERS`; ``all``: the
four against appearance, the demo's pretraining)."""

GROUPS: dict[str, tuple[str, ...]] = {
    "levers": ("baseline", *(f"+{lever}" for lever in APPEARANCE_LEVERS), "all",
               "all+same-window-negatives", "+motion-augment", "all+motion-augment",
               "all+frame-contrast"),
    "comparison": ("gt_pose", "gt_pose+mask", "uniform", "uniform+mask", "cosine",
                   "cosine+mask", "gt_pose+mask+quantizer"),
}  # fmt: skip
"""``--variants`` names that stand for several variants (the default: ``levers``)."""

REFERENCE_ROWS = ("random-init", "raw pixels 16x16", "oracle", "oracle, viewpoint-free", "chance")
"""Rows of every retrieval beside the variants' (the viewpoint-free oracle only where the
retrieval wrote it)."""


def parse_variants(text: str | None) -> list[str]:
    """``--variants``: names of :data:`VARIANTS` or :data:`GROUPS`, in order, once each."""
    names = [v.strip() for v in (text or "levers").split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and v not in GROUPS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {', '.join(unknown) or text!r}; choose from "
                         f"{', '.join([*GROUPS, *VARIANTS])}")  # fmt: skip
    return list(dict.fromkeys(v for n in names for v in GROUPS.get(n, (n,))))


def parse_steps(text: str | None) -> tuple[int, ...]:
    """``--steps 100,300,1000`` -> (100, 300, 1000); None or empty -> () (the recipe's)."""
    if not text:
        return ()
    try:
        steps = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps must be positive step counts like 100,300,1000, got {text!r}")
    return tuple(sorted(steps))


def runs(variants: list[str], budgets: tuple[int, ...] = (), quick: bool = False
         ) -> list[tuple[str, str, int | None]]:  # fmt: skip
    """(row label, run folder, steps) of every pretraining: each variant at each budget
    (``all@1000``, in folder ``all@1000``; at the recipe's own steps in the variant's plain
    folder, so an ablation run without budgets in the same OUT serves it), or at the recipe's
    steps without budgets."""
    if not budgets:
        return [(v, v.lstrip("+"), None) for v in variants]
    default = pretrain_recipe(quick)[1]
    return [(f"{v}@{n}", v.lstrip("+") + ("" if n == default else f"@{n}"), n)
            for v in variants for n in budgets]  # fmt: skip


def plan(out: Path, variants: list[str], quick: bool, nproc: int,
         budgets: tuple[int, ...] = ()) -> list[Stage]:  # fmt: skip
    """Shards (plain and appearance-swapped), then per variant (and budget): pretrain, export
    and one retrieval per held-out set (sharing one embedding cache)."""
    stages = [synth_stage(out / "shards", quick)]
    synths = [train_synth_stage(out, VARIANTS[v], quick) for v in variants]
    stages += list({s.name: s for s in synths if s is not None}.values())  # each once
    for variant in variants:
        for _, slug, steps in runs([variant], budgets, quick):
            c = lever_chain(out, out / slug, VARIANTS[variant], quick, nproc, steps)
            stages += [_named(chain.pretrain(c), f"{slug}: pretrain"),
                       _named(chain.export(c), f"{slug}: export")]  # fmt: skip
            for split in HELDOUT:
                stage = chain.retrieval(c, split, out / slug / f"retrieval-{split}",
                                        out / "cache")  # fmt: skip
                stages.append(_named(stage, f"{slug}: retrieval on {split}"))
    return stages


def _named(stage: Stage, name: str) -> Stage:
    return dataclasses.replace(stage, name=name)


def run_ablation(out_dir: str | os.PathLike, variants: str | None = None, quick: bool = False,
                 nproc: int = 2, dry_run: bool = False,
                 steps: str | None = None) -> int:  # fmt: skip
    """Run (or continue) every stage, then write DIR/ablation.json, .md and .png (and, with
    several ``steps`` budgets, DIR/ablation-scaling.png: the compute-scaling curve); with
    ``dry_run``, print the commands and run nothing."""
    chosen = parse_variants(variants)
    budgets = parse_steps(steps)
    out = Path(out_dir)
    stages = plan(out, chosen, quick, nproc, budgets)
    if dry_run:
        return print_plan(stages, "ablation")
    record_path = out / "ablation-run.json"
    settings = {"quick": quick, "nproc": nproc}  # budgets and variants have their own folders
    record = open_record(record_path, "an ablation run", settings)
    code = run_stages(stages, "ablation", record, record_path)
    if code:
        return code
    commands = {s.name: s.command for s in stages}
    results = summarize(out, chosen, commands, settings | {"steps": list(budgets)}, budgets)
    text = markdown(results)
    figures = {"ablation": plot(results)}
    if len(budgets) > 1:
        figures["ablation-scaling"] = plot_scaling(results)
    write_stage(out, "ablation", results, text, figures)
    write_report([out], out)  # OUT/report.html: every table, curve and picture, one page
    print(text)
    return 0


def _row(r: dict, chance: float, oracle: float) -> dict:
    top1 = r["mpjpe"]["top1"]
    return {"mpjpe_top1": top1, "p_mpjpe_top1": r["p_mpjpe"]["top1"],
            "gap_closed": gap_closed(top1, chance, oracle),
            "probe_mpjpe": r.get("probe", {}).get("mpjpe")}  # fmt: skip


def summarize(out: Path, variants: list[str], commands: dict, settings: dict,
              budgets: tuple[int, ...] = ()) -> dict:  # fmt: skip
    """Per held-out set: the reference rows (from the first run; random-init's input follows
    the background-mask setting, so a variant with the other setting adds its own random-init
    row) and every run's model row (``variant@steps`` with budgets)."""
    rows = runs(variants, budgets, settings["quick"])
    labels = [label for label, _, _ in rows]
    heldout = {}
    for split in HELDOUT:
        done = {label: json.loads((out / slug / f"retrieval-{split}" / "retrieval.json")
                                  .read_text()) for label, slug, _ in rows}  # fmt: skip
        first = done[labels[0]]
        chance = first["rows"]["chance"]["mpjpe"]["top1"]
        oracle = first["rows"]["oracle"]["mpjpe"]["top1"]
        manifest = json.loads((out / "shards" / split / "manifest.json").read_text())
        reference = {name: _row(first["rows"][name], chance, oracle) for name in REFERENCE_ROWS
                     if name in first["rows"]}  # fmt: skip
        masked = [label for label in labels if "background-mask" in VARIANTS[_variant(label)]]
        if masked and masked[0] != labels[0]:  # random-init sees masked frames there
            reference["random-init, background mask"] = _row(
                done[masked[0]]["rows"]["random-init"], chance, oracle)
        heldout[split] = {
            "clips": list(manifest["source"]["clips"]),
            "probe_mean_pose_mpjpe": first["protocol"]["probe_mean_pose_mpjpe"],
            "reference": reference,
            "variants": {label: _row(done[label]["rows"]["model"], chance, oracle)
                         for label in labels},  # fmt: skip
        }  # fmt: skip
    return {
        "protocol": {
            "recipe": pretrain_recipe(settings["quick"])[0], "metric": "retrieval top-1 MPJPE "
            "(mm, root-relative, query camera coordinates) of the model row, beside the "
            "references; gap closed = (chance - model) / (chance - oracle)",
            "gallery": "train", "queries": list(HELDOUT),
        },
        "settings": settings,
        "levers": {v: list(VARIANTS[v]) for v in variants},
        "steps": {label: steps for label, _, steps in rows},
        "heldout": heldout,
        "commands": {label: [commands[f"{slug}: {step}"]
                             for step in ("pretrain", "export", "retrieval on val",
                                          "retrieval on test")] for label, slug, _ in rows},
    }  # fmt: skip


def _variant(label: str) -> str:
    """The variant of a row label (``all@1000`` -> ``all``)."""
    return label.split("@", 1)[0]


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
    lines += ["Commands (after the `shards synth` runs):", ""]
    for variant, commands in results["commands"].items():
        lines.append(f"- {variant}:")
        lines += [f"  `{c}`" for c in commands]
    return "\n".join(lines) + "\n"


def plot(results: dict):
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
    return fig


def plot_scaling(results: dict):
    """Gap closed and linear-probe MPJPE against pretraining steps, per held-out set and
    variant, beside the raw-pixel level: does more compute keep helping?"""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    colours = ("tab:blue", "tab:orange", "tab:green")
    for i, (split, h) in enumerate(results["heldout"].items()):
        by_variant: dict[str, list] = {}
        for label, r in h["variants"].items():
            by_variant.setdefault(_variant(label), []).append((results["steps"][label], r))
        for variant, points in by_variant.items():
            points.sort(key=lambda p: p[0])
            steps = [p[0] for p in points]
            name = f"{split}: {variant}"
            ax.plot(steps, [100 * p[1]["gap_closed"] for p in points], marker="o", label=name,
                    color=colours[i % 3])  # fmt: skip
            bx.plot(steps, [p[1]["probe_mpjpe"] for p in points], marker="o", label=name,
                    color=colours[i % 3])  # fmt: skip
        pixels = h["reference"]["raw pixels 16x16"]
        ax.axhline(100 * pixels["gap_closed"], color=colours[i % 3], linestyle="--", lw=1)
        bx.axhline(pixels["probe_mpjpe"], color=colours[i % 3], linestyle="--", lw=1)
        bx.axhline(h["probe_mean_pose_mpjpe"], color=colours[i % 3], linestyle=":", lw=1)
    ax.set(xscale="log", xlabel="pretraining steps", ylabel="gap closed by top-1 retrieval (%)",
           title="retrieval (dashed: raw pixels)")  # fmt: skip
    bx.set(xscale="log", xlabel="pretraining steps", ylabel="linear probe MPJPE (mm)",
           title="linear probe (dashed: raw pixels, dotted: mean pose)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
