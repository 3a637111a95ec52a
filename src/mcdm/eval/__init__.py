"""Evaluation: metrics (FID, FVD, Sync-C/D, SSIM, E-FID, identity) with their backends recorded."""
