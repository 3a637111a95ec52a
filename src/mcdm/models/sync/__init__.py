"""SyncNet: one module for the data filter (``sync_filter``) and the Sync-C / Sync-D metrics.

- ``mfcc``: the 13 x 100 Hz MFCC front end (the official SyncNet's);
- ``syncnet``: the small SyncNet trained here and the official architecture (``load_syncnet``);
- ``offset``: the standard offset / confidence search (``av_offset``);
- ``evaluate``: ``sync_scores(crop_or_frames, audio, landmarks, model=...)`` for one clip;
- ``train``: training on in-sync vs shifted pairs, and the ``syncnet_train`` stage.
"""
from mcdm.models.sync.scoring import sync_result, sync_scores
from mcdm.models.sync.offset import OffsetResult, av_offset
from mcdm.models.sync.syncnet import OfficialSyncNet, SyncNet, load_syncnet

__all__ = ["OffsetResult", "OfficialSyncNet", "SyncNet", "av_offset", "load_syncnet", "sync_result", "sync_scores"]
