"""Issue #20's attempts at better faces, one table per kind of attempt, from the per-attempt JSON
files under ``benchmarks/quality_attempts/`` (each: ``name``, ``kind``, ``change``, ``verdict``,
``machine``, ``baseline`` (the row the deltas are taken against), the research script's own numbers
under ``measured``, and ``source``: where they were measured).

Kinds and what their table shows:

* ``end_to_end``: a whole main line (``dvc repro evaluate`` on a fresh copy) of a profile, recorded
  from the files the pipeline wrote (``--record-run PROJECT``): the targets table ``evaluate`` wrote
  (``reports/metrics_details.json``), PSNR, the training stages' steps and wall seconds, the evaluate
  settings that change what is generated (``eval.steps``, ``eval.use_landmarks``), and the main line's
  wall time per stage from a log of ``dvc repro`` whose lines start with ``[seconds]``.
* ``autoencoder``: a tiny VAE trained at 128 px (or today's 64 px one, the baseline) and scored on the
  held-out test frames: PSNR, the identity distance of its reconstructions minus ground truth's (the
  autoencoder-ceiling gap; target <= 0.10), Laplacian-variance sharpness over ground truth's, frames
  where dlib finds no face, CPU seconds per training step and wall seconds of training.
* ``proxy_diffusion``: a small UNet trained on that autoencoder's latents and sampled (reference frame
  as condition): the sample identity gap (target <= 0.15), sharpness, frames without a face.
* ``step_time``: CPU and wall seconds per training step of each stage (and per generated frame) at
  64 and 128 px, with the ratio to the 64 px baseline measured under the same load (shared or idle).
* ``reference_input``: the base UNet reading the reference frame through its patch tokens (today) or
  with its latent concatenated to the noisy input too (``benchmarks/quality_proxy_reference.py``),
  sampled and scored as ``proxy_diffusion``; deltas against the baseline of the same latent size.
* ``lip_sync``: Sync-C on the same SyncNet, as a fraction of ground truth's (target >= 0.5).
* ``lip_tokens``: the motion prior's sampled lip tokens against ground truth's (correlation), and a
  proxy UNet's mouth-opening correlation.

    python benchmarks/quality_attempts.py [--attempts benchmarks/quality_attempts] [--out reports]

writes ``<out>/quality_attempts.md`` and ``<out>/quality_attempts.json`` (the rows); with
``--figure docs/quality_stage3_steps.png`` it also draws the 128 px end-to-end runs that differ only in
stage-3 steps: each target's value (and interval) against the steps, the threshold dashed.

    python benchmarks/quality_attempts.py --record-run PROJECT --name NAME --change TEXT [--log LOG]

writes the attempt file ``<attempts>/NAME.json`` (kind ``end_to_end``) from a finished project.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "end_to_end": "End to end: `dvc repro evaluate` of a profile on a fresh copy, issue #20's targets as `evaluate` wrote them",
    "autoencoder": "Autoencoders (128 px unless said; scored on 105 held-out test frames, 7 clips)",
    "proxy_diffusion": "Proxy diffusion on the autoencoder's latents (105 sampled test frames)",
    "step_time": "Seconds per training step, per stage (batch as in the default; generation per frame, 10 steps)",
    "reference_input": "Reference frame as tokens or as input channels of the base UNet (60 held-out frames; deltas against the tokens row of the same latent)",
    "lip_sync": "Sync-C against ground truth (same SyncNet, 5 test clips, 225 windows)",
    "lip_tokens": "Lip motion of the motion prior's tokens and of a proxy UNet (5 test clips)",
}
STAGES = ("unet_pretrain", "stage1", "stage2", "stage3")


def _r(x, digits: int = 3) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def _cell(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _delta(x, base) -> Optional[float]:
    return None if x is None or base is None else round(x - base, 3)


def cores(machine: str) -> str:
    """The short label of a row's machine: idle or shared cores (n/a when the file does not say)."""
    return "shared" if "shared" in machine else "idle" if "idle" in machine else "n/a"


def load_attempts(folder: Path) -> list[dict]:
    """The attempt files, each kind's baseline first."""
    attempts = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    attempts.sort(key=lambda a: not a.get("baseline"))
    if not attempts:
        raise SystemExit(f"{folder}: no attempt files")
    for a in attempts:
        missing = {"name", "kind", "change", "measured", "machine"} - set(a)
        if missing or a["kind"] not in KINDS:
            raise SystemExit(f"{a.get('name')}: missing {sorted(missing)} or unknown kind {a.get('kind')!r}")
    return attempts


def _load(m: dict) -> Optional[str]:
    load = m.get("load_before") or m.get("load_avg") or (m.get("train") or {}).get("load_avg")
    return None if not load else f"{load[0]:.1f}"


TARGETS = ("resolution", "autoencoder_identity_gap", "identity_gap", "no_face_frames", "sync_c_fraction",
           "mouth_open_corr", "sharpness_ratio")


def stage_seconds(log_text: str) -> dict[str, float]:
    """Wall seconds per DVC stage from a ``dvc repro`` log whose lines start with ``[elapsed seconds]``:
    each stage runs from its ``Running stage 'x'`` line to the next one (the last to the log's end)."""
    marks = [(float(t), name) for t, name in re.findall(r"^\[\s*([\d.]+)\] Running stage '([^']+)'", log_text, re.M)]
    times = [float(t) for t in re.findall(r"^\[\s*([\d.]+)\]", log_text, re.M)]
    if not marks:
        raise SystemExit("log: no \"[seconds] Running stage\" lines")
    ends = [t for t, _ in marks[1:]] + [max(times)]
    return {name: round(end - start, 1) for (start, name), end in zip(marks, ends)}


EVAL_KEYS = ("steps", "use_landmarks")  # the evaluate settings that change what is generated


def eval_settings(params_path: Optional[Path] = None) -> dict:
    """``eval.steps`` (sampling steps) and ``eval.use_landmarks`` (driven by ground truth's landmarks) of
    a run's params file, or the schema's defaults without one."""
    from mcdm.config import EvalParams, load_params

    e = EvalParams() if params_path is None else load_params(params_path).eval
    return {k: getattr(e, k) for k in EVAL_KEYS}


def default_eval_settings() -> dict:
    return eval_settings()


def record_run(project: Path, log: Optional[Path]) -> dict:
    """The ``measured`` part of an ``end_to_end`` attempt, from the files a main line wrote."""
    details = json.loads((project / "reports" / "metrics_details.json").read_text())
    stage_reports = {k: json.loads((project / "reports" / f"train_stage{k}.json").read_text()) for k in (1, 2, 3)}
    measured = {
        "quality_targets": details["quality_targets"],
        "psnr": details.get("psnr"), "autoencoder_psnr_heldout": details.get("autoencoder_psnr_heldout"),
        "identity": details.get("identity"), "identity_gt": details.get("identity_gt"),
        "n_clips": details.get("n_clips"), "frames": details.get("frames"), "seed": details.get("seed"),
        "params_hash": details.get("params_hash"),
        "resolution": int(details["quality_targets"]["resolution"]["value"]),  # the generated frames' side
        "train_wall_s": {f"stage{k}": stage_reports[k]["train_wall_s"] for k in (1, 2, 3)},
        "train_steps": {f"stage{k}": stage_reports[k].get("steps") for k in (1, 2, 3)},
        "base_models_s": json.loads((project / "models" / "base" / "encoders.json").read_text()).get("seconds"),
        "eval_settings": eval_settings(project / "params.yaml"),
    }
    if log is not None:
        stages = stage_seconds(log.read_text(errors="replace"))
        measured["stage_wall_s"] = stages
        measured["main_line_wall_s"] = round(sum(stages.values()), 1)
    return measured


STAGE_GROUPS = (("data", ("params_check", "sample_data", "ingest", "scenes", "faces", "quality", "syncnet_train",
                            "sync_filter", "split")),
                ("base_models", ("base_models",)), ("features+encoders", ("features", "motion_encoders")),
                ("training", ("train_stage1", "train_stage2", "train_stage3")), ("evaluate", ("evaluate",)))


def minutes_per_group(stage_wall_s: dict[str, float]) -> str:
    """``data 2.3, base_models 2.7, ...``: a main line's wall minutes per group of stages."""
    parts = [(name, sum(stage_wall_s.get(s, 0.0) for s in stages)) for name, stages in STAGE_GROUPS]
    return ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in parts if round(seconds / 60, 1))


def end_to_end_row(a: dict) -> dict:
    m = a["measured"]
    targets = m["quality_targets"]
    whole = m.get("main_line_wall_s") is not None and "base_models" in m.get("stage_wall_s", {})  # not a re-evaluate
    row = {"attempt": a["name"], "change": a["change"],
           "main_line_min": round(m["main_line_wall_s"] / 60, 1) if whole else None}
    for key in TARGETS:
        t = targets.get(key)
        if t is None:
            row[key] = None
            continue
        value = _cell(_r(t["value"]))
        if "low" in t:
            value += f" [{_r(t['low'], 2)}, {_r(t['high'], 2)}]"
        row[key] = f"{value} ({'met' if t['met'] else 'no'})"
    row.update(minutes_per_stage=None if not m.get("stage_wall_s") else minutes_per_group(m["stage_wall_s"]),
               psnr_db=_r(m.get("psnr"), 1), targets_met=f"{sum(t['met'] for t in targets.values())}/{len(targets)}",
               machine=a["machine"], verdict=a.get("verdict", ""))
    return row


TREND_PANELS = (("sync_c_fraction", "Sync-C / ground truth's"), ("mouth_open_corr", "mouth-opening correlation"),
                ("identity_gap", "identity gap"))


def stage3_trend(attempts: list[dict], resolution: int = 128) -> list[dict]:
    """The end-to-end runs at ``resolution`` that differ in stage-3 steps only (their other stages' steps
    equal to the fewest-steps run's, evaluated with the schema's sampling steps and without ground truth's
    landmarks), in order of stage-3 steps: one point each with the targets' values."""
    default = default_eval_settings()
    runs = [a for a in attempts if a["kind"] == "end_to_end" and a["measured"].get("train_steps")
            and a["measured"].get("resolution") == resolution
            and a["measured"].get("eval_settings", default) == default]
    if not runs:
        return []
    runs.sort(key=lambda a: a["measured"]["train_steps"]["stage3"])
    first = runs[0]["measured"]["train_steps"]
    same = [a for a in runs if all(a["measured"]["train_steps"][k] == first[k] for k in ("stage1", "stage2"))]
    points = []
    for a in same:
        targets = a["measured"]["quality_targets"]
        points.append({"attempt": a["name"], "stage3_steps": a["measured"]["train_steps"]["stage3"],
                       **{key: targets[key] for key, _ in TREND_PANELS if key in targets}})
    return points


def plot_stage3_trend(points: list[dict], path: Path) -> Path:
    """One panel per target: its value against stage-3 steps (the interval where the run wrote one) and
    the target's threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcdm.media.files import save_figure

    fig, axes = plt.subplots(1, len(TREND_PANELS), figsize=(4 * len(TREND_PANELS), 3.2))
    steps = [p["stage3_steps"] for p in points]
    for ax, (key, label) in zip(axes, TREND_PANELS):
        have = [p for p in points if key in p]
        x, y = [p["stage3_steps"] for p in have], [p[key]["value"] for p in have]
        if have and "low" in have[0][key]:
            err = [[v - p[key]["low"] for p, v in zip(have, y)], [p[key]["high"] - v for p, v in zip(have, y)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
        else:
            ax.plot(x, y, marker="o")
        threshold = have[0][key]["target"] if have else ""
        number = re.search(r"[-\d.]+", threshold)
        if number:
            ax.axhline(float(number.group()), ls="--", color="grey", label=f"target {threshold}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(steps)
        ax.set_xlabel("stage-3 steps")
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"Quality profile ({len(points)} runs, 5 test clips, seed 0): issue #20's targets against stage-3 "
                 "steps", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def autoencoder_row(a: dict, base: Optional[dict]) -> dict:
    m, train = a["measured"], a.get("train") or {}
    gap = _r(m["ae_identity"] - m["gt_identity"])
    base_gap = None if base is None else _r(base["measured"]["ae_identity"] - base["measured"]["gt_identity"])
    return {"attempt": a["name"], "change": a["change"], "resolution": m.get("res"),
            "psnr_db": _r(m.get("psnr_heldout"), 2),
            "psnr_delta": None if base is None else _delta(m.get("psnr_heldout"), base["measured"].get("psnr_heldout")),
            "ae_identity_gap": gap, "ae_identity_gap_delta": _delta(gap, base_gap),
            "sharpness_ratio": _r(m.get("lapvar_ratio")), "no_face_frames": f"{m.get('no_face')}/{m.get('n_eval')}",
            "cpu_s_per_step": _r(m.get("cpu_s_per_step") or train.get("s_per_step")),
            "train_wall_s": _r(m.get("train_wall_s") or train.get("train_s"), 0),
            "load_avg": _load({**m, "train": train}), "machine": a["machine"], "verdict": a.get("verdict", "")}


def proxy_row(a: dict, base: Optional[dict]) -> dict:
    m = a["measured"]
    gap = None if m.get("sample_identity") is None else _r(m["sample_identity"] - m["gt_identity"])
    base_gap = None if base is None else _r(base["measured"]["sample_identity"] - base["measured"]["gt_identity"])
    return {"attempt": a["name"], "change": a["change"], "latent": "x".join(str(v) for v in m.get("latent", [])),
            "unet_steps": m.get("unet_steps"), "sample_identity_gap": gap, "sample_identity_gap_delta": _delta(gap, base_gap),
            "sharpness_ratio": _r(m.get("sample_lapvar_ratio")), "no_face_frames": f"{m.get('sample_no_face')}/{m.get('n')}",
            "cpu_s_per_step": _r(m.get("unet_cpu_s_per_step")), "train_cpu_s": _r(m.get("unet_train_cpu_s"), 0),
            "sample_cpu_ms_per_frame": _r(m.get("sample_cpu_ms_per_frame"), 1), "machine": a["machine"],
            "verdict": a.get("verdict", "")}


def step_rows(attempts: list[dict]) -> list[dict]:
    """Per attempt and stage: CPU and wall s/step, and the ratio of CPU s/step to the 64 px baseline
    measured under the same load (idle against idle, shared against shared)."""
    base = {a["name"].endswith("idle"): a for a in attempts if a.get("baseline")}
    rows = []
    for a in attempts:
        m, ref = a["measured"], base.get(a["name"].endswith("idle"))
        for stage in (*STAGES, "generation"):
            s = m.get(stage)
            if not s:
                continue
            cpu = s.get("cpu_s_per_step", s.get("cpu_s_per_frame"))
            wall = s.get("wall_s_per_step", s.get("wall_s_per_frame"))
            ref_cpu = None if ref is None or not ref["measured"].get(stage) else \
                ref["measured"][stage].get("cpu_s_per_step", ref["measured"][stage].get("cpu_s_per_frame"))
            rows.append({"attempt": a["name"], "change": a["change"], "resolution": m.get("res"), "stage": stage,
                         "cpu_s": _r(cpu), "wall_s": _r(wall), "cpu_ratio_to_64px": None if not ref_cpu else _r(cpu / ref_cpu, 2),
                         "load_avg": _load(m), "machine": a["machine"]})
    return rows


def sync_row(a: dict) -> dict:
    m = a["measured"]
    gt = m["ground_truth"]["sync_c"]
    arms = {k: v for k, v in m.items() if isinstance(v, dict) and "sync_c" in v and k != "ground_truth"}
    return {"attempt": a["name"], "change": a["change"], "resolution": m.get("res", 64), "ground_truth_sync_c": _r(gt),
            **{f"{k}_fraction": _r(v["sync_c"] / gt) for k, v in arms.items()},
            "train_wall_s": (a.get("train") or {}).get("wall_s"), "machine": a["machine"], "verdict": a.get("verdict", "")}


def tokens_row(a: dict) -> dict:
    m = a["measured"]
    row = {"attempt": a["name"], "change": a["change"]}
    if "prior_sampled_lip" in m:
        row.update({f"sampled_corr_{g}": _r(v["corr"]) for g, v in m["prior_sampled_lip"].items()})
        row["audio_ridge_corr_best"] = _r(max(v["corr"] for v in m["ridge_audio_window_to_lip"].values()))
    else:
        row.update({f"mouth_open_corr_{k}": _r(v["corr_open"]) for k, v in m.items() if isinstance(v, dict)})
    row.update(train_wall_s=(a.get("train") or {}).get("wall_s"), machine=a["machine"], verdict=a.get("verdict", ""))
    return row


def build(attempts: list[dict]) -> dict[str, list[dict]]:
    by_kind = {k: [a for a in attempts if a["kind"] == k] for k in KINDS}
    base = {k: next((a for a in v if a.get("baseline")), None) for k, v in by_kind.items()}
    latent_base = {tuple(a["measured"]["latent"]): a for a in by_kind["reference_input"] if a.get("baseline")}

    def same_latent_base(a: dict) -> Optional[dict]:  # reference input: deltas within one latent size, none for the base
        b = latent_base.get(tuple(a["measured"]["latent"]))
        return None if b is a else b

    return {
        "end_to_end": [end_to_end_row(a) for a in by_kind["end_to_end"]],
        "autoencoder": [autoencoder_row(a, None if a is base["autoencoder"] else base["autoencoder"])
                        for a in by_kind["autoencoder"]],
        "proxy_diffusion": [proxy_row(a, None if a is base["proxy_diffusion"] else base["proxy_diffusion"])
                            for a in by_kind["proxy_diffusion"]],
        "reference_input": [proxy_row(a, same_latent_base(a)) for a in by_kind["reference_input"]],
        "step_time": step_rows(by_kind["step_time"]),
        "lip_sync": [sync_row(a) for a in by_kind["lip_sync"]],
        "lip_tokens": [tokens_row(a) for a in by_kind["lip_tokens"]],
    }


def md_table(rows: list[dict]) -> list[str]:
    cols = [*dict.fromkeys(k for r in rows for k in r if k not in ("machine", "verdict")), "cores", "verdict"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cores(r["machine"]) if c == "cores" else _cell(r.get(c)) for c in cols) + " |"
              for r in rows]
    return lines


def render(tables: dict[str, list[dict]], folder: str) -> str:
    lines = ["# Issue #20: attempts at better faces", "",
             f"Written by `benchmarks/quality_attempts.py` from the per-attempt files in `{folder}/` (each keeps the "
             "research script's own numbers under `measured` and says where they were measured). All were measured "
             "on this project's 2-core CPU machine; rows marked *shared* ran while other work held the cores (their "
             "wall seconds and s/step are inflated, the load average at the start is given; CPU seconds are the "
             "process's own), rows marked *idle* on quiet cores. Deltas are against the kind's baseline row "
             "(today's 64 px setting). Identity gap: identity distance minus ground truth's on the same frames "
             "(dlib descriptor; different people score 0.50-0.70). Sharpness ratio: variance of the Laplacian over "
             "ground truth's. Targets: autoencoder gap <= 0.10, sample gap <= 0.15, no frame without a face, "
             "Sync-C >= 50% of ground truth's, mouth-opening correlation >= 0.5, sharpness 0.5-1.5.", ""]
    for kind, rows in tables.items():
        if not rows:
            continue
        lines += [f"## {KINDS[kind]}", "", *md_table(rows), ""]
        machines = sorted({r["machine"] for r in rows})
        lines += [f"Machine: {'; '.join(machines)}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attempts", default=str(ROOT / "benchmarks" / "quality_attempts"))
    ap.add_argument("--out", default=str(ROOT / "reports"))
    ap.add_argument("--record-run", metavar="PROJECT", help="write an end_to_end attempt file from this finished project")
    ap.add_argument("--name", help="--record-run: the attempt's name (its file name)")
    ap.add_argument("--change", help="--record-run: what the run is (profile, what differs)")
    ap.add_argument("--machine", default="2 cores, idle", help="--record-run: the cores and their load during the run")
    ap.add_argument("--log", help="--record-run: the timestamped `dvc repro` log ([seconds] at each line's start)")
    ap.add_argument("--figure", help="also draw the 128 px end-to-end runs' targets against stage-3 steps here (PNG)")
    args = ap.parse_args(argv)
    folder = Path(args.attempts)
    if args.record_run:
        if not (args.name and args.change):
            raise SystemExit("--record-run needs --name and --change")
        measured = record_run(Path(args.record_run), Path(args.log) if args.log else None)
        attempt = {"name": args.name, "kind": "end_to_end", "change": args.change, "machine": args.machine,
                   "source": f"--record-run of a fresh copy's `dvc repro evaluate` ({measured['params_hash']})",
                   "measured": measured}
        (folder / f"{args.name}.json").write_text(json.dumps(attempt, indent=1) + "\n")
        print(f"wrote {folder / (args.name + '.json')}")
        return 0
    attempts = load_attempts(folder)
    tables = build(attempts)
    if args.figure:
        points = stage3_trend(attempts)
        print(f"wrote {plot_stage3_trend(points, Path(args.figure))} ({len(points)} runs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        shown = folder.resolve().relative_to(ROOT)
    except ValueError:
        shown = folder
    (out / "quality_attempts.md").write_text(render(tables, str(shown)) + "\n")
    (out / "quality_attempts.json").write_text(json.dumps(tables, indent=1) + "\n")
    print(f"wrote {out / 'quality_attempts.md'} ({sum(map(len, tables.values()))} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
