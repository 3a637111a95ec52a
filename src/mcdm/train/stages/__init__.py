"""The three MCDM training stages (paper Sec. 3.5; decisions.md #4, #6) over the one engine.

Each stage is a :class:`StageTask`: what it builds (trained and frozen modules under one root, the
:class:`StageModel` DeepSpeed wraps), its data, its loss and what it exports. :func:`~mcdm.train.stages.run.run_stage` is the
one entry point (``mcdm train --stage N``): it trains through :func:`mcdm.train.engine.train_loop`
(DeepSpeed, checkpoints, resume, NaN stop), exports, and writes the metrics, the loss curve and the
MLflow run.

=====  =========================================================  ==========================================
stage  trains                                                     frozen / not used
=====  =========================================================  ==========================================
1      archived-clip prior (patchify, frame-aligned attention,    present-clip reference attention, MTA
       queries), archived-clip reference attention, the UNet's    (zero-initialised: identity)
       spatial layers, the landmark guider
2      the present-clip motion-prior diffusion model (random      landmark guider (stage 1), motion encoders
       whole-landmark-clip drop); wo_fpc: fits the audio tokens
3      ONLY the present-clip reference attention and the MTA,     everything else (stage 1's denoiser and
       on runs of K consecutive clips, memory carried detached    guider, stage 2's prior)
=====  =========================================================  ==========================================

Losses (standard diffusion MSE, in the base UNet's parameterisation: y = eps for SD-1.5, y = v =
sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 for the pretrained tiny UNet; :mod:`mcdm.models.diffusion_objective`):

* stages 1 and 3:  L = E_{z_0, eps, t} || y_t - f_theta(z_t, t, z_ref, z_arch, F_pc, G(landmarks)) ||^2,
  z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with the base UNet's training schedule, the frames'
  eps of a clip correlated by ``model.frame_noise_correlation`` (``mcdm.models.frame_noise``); the landmark
  guider's features G are dropped for a whole clip with probability ``model.p_drop_landmarks``
  (generation runs without a driving video by default).
  The timesteps of a step's clips are stratified (one per 1/n of [0, T), Kingma et al. 2021): the
  same expected loss with less variance between steps.
* stage 3 over a run of K clips: M_0 = none; for k = 1..K: (y_hat_k, M_k) = f_theta(..., M_{k-1});
  M_k is detached before it is carried (decisions.md #6), L = mean_k L_k. Each clip has its own
  timestep, so the carried memory comes from every noise level (generation carries the memory of
  the previous clip's last, least noisy step). F_pc comes from the frozen stage-2 prior's token
  embeddings of the clip's true motion tokens (generation: the prior's sampled tokens).
  Noise, timesteps and landmark drops are drawn per sample of the global batch
  (:mod:`mcdm.train.step_random`): the same training on 1 rank or N.
* stage 2:  Eq. 3, ``PresentClipMotionPrior.training_loss``, drawing from each rank's RNG and
  normalised per rank (by the elements it denoised): on N ranks the same training in distribution,
  not in numbers.

Exports (diffusers folders, safetensors + config.json, written to ``<out>.tmp`` and renamed; beside
them ``stage.json`` with the params hash): stage 1 -> ``denoiser/``, ``landmark_guider/``; stage 2 ->
``motion_prior/`` (wo_fpc: ``audio_tokens/``); stage 3 -> ``denoiser/``.
"""
