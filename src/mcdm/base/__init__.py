"""Base models (DECISIONS #1, #2): the VAE, the SD-shaped UNet, the scheduler and the frozen encoders.

``base_models`` (:mod:`mcdm.base.pretrain`) loads them from local paper-scale folders or pretrains tiny
ones on the training frames; every later stage loads them through :mod:`mcdm.base.loading`.
"""
