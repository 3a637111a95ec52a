"""Figure 5: SSIM and identity over the frame index of a long generated sequence (decisions.md #11)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.eval import metrics as M
from mcdm.eval.face_features import DlibFrameFeatures
from mcdm.eval.plots import plot_long_term
from mcdm.eval.test_set import ClipFeatures, read_index
from mcdm.eval.video_metrics import _nanmean
from mcdm.media.files import jsonable, write_csv
from mcdm.media.io import write_video
from mcdm.pipelines.loading import load_from_models_dir


# ---------------------------------------------------------------------------------------------- long term
def long_term_curve(pipe, features_dir: str | Path, csv_path: str | Path, params: Params,
                    png_path: Optional[str | Path] = None, video_dir: Optional[str | Path] = None,
                    faces=None, label: Optional[str] = None, progress: bool = True) -> dict:
    """Figure 5: SSIM and identity over the frame index of a long generated sequence.

    ``pipe``: an ``MCDMPipeline`` (any variant) or a models folder. On the first
    ``eval.long_term_clips`` long-term test clips (else the longest test clip, labelled), generates
    ``min(eval.long_term_seconds, clip length)`` from the clip's reference frame and audio, clip by
    clip; every ``eval.long_term_every`` frames one CSV row: ``frame, ssim`` (mean SSIM over those
    frames), ``identity`` and ``identity_gt`` (dlib-descriptor distance of the generated and of the
    ground-truth frame to the reference; NaN without a face). Several clips are averaged per row.
    Writes ``csv_path`` (and ``png_path``, and ``video_dir/long_term_<clip>.mp4`` with its audio);
    returns a summary (means, first / last ``eval.drift_tail`` of the sequence, drifts).
    """

    if isinstance(pipe, (str, Path)):
        pipe = load_from_models_dir(pipe, params)
    p, fps, rate = params.eval, params.data.fps, params.data.audio_rate
    faces = faces or DlibFrameFeatures(min_side=p.dlib_min_side)
    index = read_index(features_dir)
    test = index[index["split"] == "test"]
    if test.empty:
        raise McdmError("features: the test split holds no clip for the long-term curve")
    chosen, source = test[test["long_term"]], "long_term"
    if chosen.empty:
        chosen, source = test.sort_values("n_frames", ascending=False), "longest test clip (no long_term clip in the test split)"
    chosen = chosen.sort_values("clip_id").head(p.long_term_clips)
    k = p.long_term_every
    tables, lengths = [], []
    for row in chosen.to_dict("records"):
        clip = ClipFeatures(row["file"])
        n = min(clip.n_frames, max(1, int(round(p.long_term_seconds * fps))))
        ref, ref_lm = clip.frames(0, 1), clip.landmarks(0, 1)
        wave = clip.waveform(n, fps, rate)
        ssim = np.full(n, np.nan)
        identity, identity_gt = np.full(n, np.nan), np.full(n, np.nan)
        try:
            M.identity_curve(ref[0], ref, faces)
            with_identity = True
        except McdmError:
            with_identity = False  # no face in the reference: identity cannot be measured (NaN)
        ref_latent, ref_emb = pipe.encode_reference(ref, ref_lm)
        feats = pipe.audio_features(wave, n)[None]
        lm = pose = None
        if p.use_landmarks:
            lm, pose = pipe.prepare_driving(clip.landmarks(0, n), n)
        clips = pipe.iter_clips(ref_latent, ref_emb, feats, landmarks=lm, head_pose=pose,
                                num_inference_steps=p.steps, generator=torch.Generator().manual_seed(params.seed))
        bar = tqdm(total=n, desc=f"long-term {row['clip_id']}", unit="frame", disable=not progress)

        def frames():
            for state in clips:
                fake = state.frames[0]
                s, e = state.start, state.start + len(fake)
                gt = clip.frames(s, e)
                ssim[s:e] = M.ssim(gt, fake, 255.0)
                picks = np.arange(s + (-s) % k, e, k)
                if with_identity and len(picks):
                    identity[picks] = M.identity_curve(ref[0], fake[picks - s], faces)
                    identity_gt[picks] = M.identity_curve(ref[0], gt[picks - s], faces)
                bar.update(len(fake))
                yield from fake

        if video_dir is not None:
            write_video(Path(video_dir) / f"long_term_{row['clip_id']}.mp4", frames(), fps=fps, audio=wave, audio_rate=rate)
        else:
            for _ in frames():
                pass
        bar.close()
        lengths.append(n)
        starts = np.arange(0, n, k)
        tables.append(pd.DataFrame({
            "frame": starts,
            "ssim": [np.nanmean(ssim[f:f + k]) for f in starts],
            "identity": identity[starts],
            "identity_gt": identity_gt[starts],
        }))
    curve = pd.concat(tables).groupby("frame", as_index=False).mean() if len(tables) > 1 else tables[0]
    write_csv(curve, Path(csv_path))
    if png_path is not None:
        name = label or pipe.variant
        plot_long_term({name: curve}, png_path, title=f"long-term generation ({name}, {max(lengths) / fps:.1f} s, "
                                                      f"{', '.join(chosen['clip_id'])})")
    tail = max(1, int(round(p.drift_tail * len(curve))))

    def first_last(col):
        values = curve[col].to_numpy(np.float64)
        return _nanmean(values[:tail]), _nanmean(values[-tail:])

    s_first, s_last = first_last("ssim")
    return jsonable({
        "clips": list(chosen["clip_id"]), "source": source, "frames": int(max(lengths)),
        "seconds": float(max(lengths) / fps), "every": k,
        "ssim_mean": _nanmean(curve["ssim"]), "ssim_first": s_first, "ssim_last": s_last,
        "ssim_drift": None if s_first is None or s_last is None else s_last - s_first,
        "identity_mean": _nanmean(curve["identity"]), "identity_drift": M.curve_drift(curve["identity"], p.drift_tail),
        "identity_gt_mean": _nanmean(curve["identity_gt"]),
        "identity_gt_drift": M.curve_drift(curve["identity_gt"], p.drift_tail),
        "identity_no_face_rows": int(np.isnan(curve["identity"]).sum()),
    })
