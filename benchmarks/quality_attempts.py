"""Issue #20's attempts at better faces, one table per kind of attempt, from the per-attempt JSON
files under ``benchmarks/quality_attempts/`` (each: ``name``, ``kind``, ``change``, ``verdict``,
``machine``, ``baseline`` (the row the deltas are taken against), the research script's own numbers
under ``measured``, and ``source``: where they were measured).

Kinds and what their table shows:

* ``autoencoder``: a tiny VAE trained at 128 px (or today's 64 px one, the baseline) and scored on the
  held-out test frames: PSNR, the identity distance of its reconstructions minus ground truth's (the
  autoencoder-ceiling gap; target <= 0.10), Laplacian-variance sharpness over ground truth's, frames
  where dlib finds no face, CPU seconds per training step and wall seconds of training.
* ``proxy_diffusion``: a small UNet trained on that autoencoder's latents and sampled (reference frame
  as condition): the sample identity gap (target <= 0.15), sharpness, frames without a face.
* ``step_time``: CPU and wall seconds per training step of each stage (and per generated frame) at
  64 and 128 px, with the ratio to the 64 px baseline measured under the same load (shared or idle).
* ``lip_sync``: Sync-C on the same SyncNet, as a fraction of ground truth's (target >= 0.5).
* ``lip_tokens``: the motion prior's sampled lip tokens against ground truth's (correlation), and a
  proxy UNet's mouth-opening correlation.

    python benchmarks/quality_attempts.py [--attempts benchmarks/quality_attempts] [--out reports]

writes ``<out>/quality_attempts.md`` and ``<out>/quality_attempts.json`` (the rows).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "autoencoder": "Autoencoders (128 px unless said; scored on 105 held-out test frames, 7 clips)",
    "proxy_diffusion": "Proxy diffusion on the autoencoder's latents (105 sampled test frames)",
    "step_time": "Seconds per training step, per stage (batch as in the default; generation per frame, 10 steps)",
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
    return "idle" if "idle" in machine else "shared" if "shared" in machine else "n/a"


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
    return {
        "autoencoder": [autoencoder_row(a, None if a is base["autoencoder"] else base["autoencoder"])
                        for a in by_kind["autoencoder"]],
        "proxy_diffusion": [proxy_row(a, None if a is base["proxy_diffusion"] else base["proxy_diffusion"])
                            for a in by_kind["proxy_diffusion"]],
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
    args = ap.parse_args(argv)
    folder = Path(args.attempts)
    tables = build(load_attempts(folder))
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
