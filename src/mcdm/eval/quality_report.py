"""The report's section on what a person sees (issue #20): the targets of
``mcdm.eval.quality_targets`` with the measured value and whether each is met, and the measures
behind them for the model and the baselines of the same run (the autoencoder ceiling: ground truth
through the frozen VAE; the static reference; ground truth)."""
from __future__ import annotations

from typing import Optional

from mcdm.eval.ablation_tables import fmt, md_table

TARGET_LABELS = {
    "resolution": "generated frame side, px",
    "autoencoder_identity_gap": "autoencoder ceiling's identity distance - ground truth's",
    "identity_gap": "generated identity distance - ground truth's (lost faces charged 1.0)",
    "no_face_frames": "generated frames without a face (identity's frames)",
    "sync_c_fraction": "Sync-C / ground truth's Sync-C (same SyncNet, training split only)",
    "mouth_open_corr": "mouth-opening correlation with ground truth (mean over clips [95% CI])",
    "sharpness_ratio": "Laplacian variance, generated / ground truth",
}
MEASURES = (("psnr", "PSNR vs ground truth, dB"), ("sharpness_ratio", "sharpness ratio (Laplacian variance / ground truth's)"),
            ("mouth_open_corr", "mouth-opening correlation"), ("mouth_open_std_ratio", "mouth-opening std / ground truth's"),
            ("identity", "identity distance (lost faces charged)"), ("sync_c", "Sync-C"))
ARMS = (("autoencoder", "autoencoder ceiling"), ("static_reference", "static reference"), ("ground_truth", "ground truth"))


def _value(entry: dict) -> str:
    text = fmt(entry.get("value"), 3)
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{fmt(entry['low'], 3)}, {fmt(entry['high'], 3)}]"
    return text


def quality_section(main: Optional[dict]) -> list[str]:
    lines = ["## What a person sees: issue #20's targets", ""]
    targets = (main or {}).get("quality_targets")
    if not targets:
        return lines + ["Missing: the main line's quality targets (`dvc repro evaluate` writes them).", ""]
    rows = [[TARGET_LABELS.get(k, k), _value(v), v.get("target"), fmt(v.get("met"))] for k, v in targets.items()]
    lines += [md_table(["target", "measured", "target", "met"], rows), ""]
    base = main.get("baselines") or {}
    rows = [[label, fmt(main.get(key), 3), *[fmt((base.get(arm) or {}).get(key), 3) for arm, _ in ARMS]]
            for key, label in MEASURES]
    lines += [md_table(["measure", "ours (main line)", *[label for _, label in ARMS]], rows), ""]
    held = main.get("autoencoder_psnr_heldout")
    lines += [f"The autoencoder's PSNR on the held-out training clips (the `base_models` gate): {fmt(held, 3)} dB; "
              "on the test clips: the autoencoder ceiling's PSNR above. Mouth opening: the inner-lip gap over the outer "
              "eye corners' distance from dlib's 68 landmarks on every frame, correlated over time with ground "
              "truth's per clip (`src/mcdm/eval/lip_motion.py`; a generated frame without a face is charged, "
              "pulling r towards 0). Sharpness: variance of the Laplacian of the grayscale frame at the crop's "
              "resolution (`src/mcdm/eval/sharpness.py`). What moved these numbers and what did not: "
              "`reports/quality_attempts.md`.", ""]
    return lines
