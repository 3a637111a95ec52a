"""SyncNet: one module for the data filter (``sync_filter``) and the Sync-C / Sync-D metrics.

- ``mfcc``: the 13 x 100 Hz MFCC front end (the official SyncNet's);
- ``syncnet``: the small SyncNet trained here and the official architecture (``load_syncnet``);
- ``offset``: the standard offset / confidence search (``av_offset``);
- ``scoring``: ``sync_scores(frames, audio, landmarks, model=...)`` for one clip (arrays in).

Training (in-sync vs shifted pairs, the ``syncnet_train`` stage) is :mod:`mcdm.train.syncnet`; the
``sync_filter`` stage reads a clip's files with :func:`mcdm.data.sync_filter.read_sync_clip`.
"""
from mcdm.models.sync.offset import OffsetResult, av_offset
from mcdm.models.sync.scoring import sync_result, sync_scores
from mcdm.models.sync.syncnet import OfficialSyncNet, SyncNet, load_syncnet

__all__ = ["OffsetResult", "OfficialSyncNet", "SyncNet", "av_offset", "load_syncnet", "sync_result", "sync_scores"]
