"""SyncNet (Chung & Zisserman, "Out of time: automated lip sync in the wild", 2017): two streams that
embed a 0.2 s audio window (13 x 20 MFCC) and the 5 video frames it spans into one space, where the
Euclidean distance is small for in-sync pairs and large for shifted ones.

Two networks with one interface (``embed_video``, ``embed_audio``, ``input_kind``):

- ``SyncNet``: the small SyncNet trained in this pipeline (``syncnet_train``). Video input is
  ``(B, 1, 5, H, W)`` grayscale mouth crops, fused early (the 5 frames are the channels of the first
  convolution, as in the paper); audio input is ``(B, 1, 13, 20)``. Embeddings are L2-normalised,
  so distances lie in [0, 2]. Sized by ``SyncNetParams``.
- ``OfficialSyncNet``: the architecture of the released ``syncnet_v2.model`` (joonson/syncnet_python),
  with the same module names, so that file's state dict loads key for key (``from_official``). Its
  inputs are ``(B, 3, 5, 224, 224)`` BGR face crops in 0..255 and MFCCs of int16-scaled audio; its
  1024-d embeddings are not normalised (distances of a few units; Sync-C ~ 7-8 on real talking heads).

Both are diffusers ``ModelMixin, ConfigMixin`` models: ``save_pretrained`` writes config.json +
safetensors and ``load_syncnet`` reads either folder, or an official ``.model`` file by path.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from mcdm.errors import McdmError
from mcdm.models.sync.mfcc import N_MFCC, WINDOW_FRAMES, WINDOW_MFCC


def _conv_stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def bn_relu2(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


def bn_relu3(c: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(c), nn.ReLU(inplace=True)]


def _halved(size: int, times: int) -> int:
    for _ in range(times):
        size = (size + 1) // 2  # a 3x3 conv, stride 2, padding 1
    return size


class SyncNet(ModelMixin, ConfigMixin):
    """Small two-stream SyncNet: audio CNN + early-fusion video CNN -> L2-normalised embeddings."""

    input_kind = "mouth"  # grayscale mouth crops (see mcdm.models.sync.scoring.mouth_crops)

    @register_to_config
    def __init__(
        self,
        mouth_height: int = 32,
        mouth_width: int = 48,
        window_frames: int = WINDOW_FRAMES,
        n_mfcc: int = N_MFCC,
        window_mfcc: int = WINDOW_MFCC,
        channels: tuple[int, ...] = (32, 64, 128, 128),
        embed_dim: int = 128,
    ):
        super().__init__()
        channels = list(channels)
        # audio stream: per-coefficient input normalisation (running stats), then stride-2 stages
        self.audio_norm = nn.BatchNorm1d(n_mfcc)
        self.audio_cnn = nn.Sequential(*[
            _conv_stage(c_in, c_out, stride=2) for c_in, c_out in zip([1] + channels[:-1], channels)
        ])
        audio_flat = channels[-1] * _halved(n_mfcc, len(channels)) * _halved(window_mfcc, len(channels))
        self.audio_fc = nn.Sequential(nn.Linear(audio_flat, 2 * embed_dim), nn.ReLU(inplace=True),
                                      nn.Linear(2 * embed_dim, embed_dim))
        # video stream: the 5 frames are the input channels (early fusion, as in the paper)
        self.video_norm = nn.BatchNorm2d(window_frames)
        self.video_cnn = nn.Sequential(*[
            _conv_stage(c_in, c_out, stride=2)
            for c_in, c_out in zip([window_frames] + channels[:-1], channels)
        ])
        video_flat = channels[-1] * _halved(mouth_height, len(channels)) * _halved(mouth_width, len(channels))
        self.video_fc = nn.Sequential(nn.Linear(video_flat, 2 * embed_dim), nn.ReLU(inplace=True),
                                      nn.Linear(2 * embed_dim, embed_dim))

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 13, 20)`` MFCC windows -> ``(B, D)`` unit-norm embeddings."""
        # 1. normalise each cepstral coefficient: (B, 1, 13, 20) -> (B, 13, 20) -> back
        x = rearrange(self.audio_norm(rearrange(mfcc, "b 1 c t -> b c t")), "b c t -> b 1 c t")
        # 2. conv stages: (B, C, 1, 2) at the default sizes; 3. project and normalise
        x = self.audio_cnn(x)
        return F.normalize(self.audio_fc(x.flatten(1)), dim=-1)

    def embed_video(self, mouths: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 5, H, W)`` mouth crops in [0, 1] -> ``(B, D)`` unit-norm embeddings."""
        # 1. early fusion: frames become channels
        x = self.video_norm(rearrange(mouths, "b 1 f h w -> b f h w"))
        # 2. conv stages: (B, C, H/16, W/16); 3. project and normalise
        x = self.video_cnn(x)
        return F.normalize(self.video_fc(x.flatten(1)), dim=-1)

    def forward(self, mouths: torch.Tensor, mfcc: torch.Tensor) -> torch.Tensor:
        """Euclidean distance ``||v - a||`` of each (video window, audio window) pair: ``(B,)``."""
        return torch.linalg.vector_norm(self.embed_video(mouths) - self.embed_audio(mfcc), dim=-1)


class OfficialSyncNet(ModelMixin, ConfigMixin):
    """The released SyncNet (``syncnet_v2.model``) layout: module names match its state dict keys
    (``netcnnaud.*``, ``netfcaud.*``, ``netcnnlip.*``, ``netfclip.*``)."""

    input_kind = "face224"  # BGR face crops resized to 224 x 224, values 0..255

    @register_to_config
    def __init__(self, embed_dim: int = 1024, image_size: int = 224, audio_scale: float = 32768.0):
        super().__init__()
        # audio: (B, 1, 13, 20) -> (B, 512, 1, 1)
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), *bn_relu2(64), nn.MaxPool2d(1, 1),
            nn.Conv2d(64, 192, 3, padding=1), *bn_relu2(192), nn.MaxPool2d(3, stride=(1, 2)),
            nn.Conv2d(192, 384, 3, padding=1), *bn_relu2(384),
            nn.Conv2d(384, 256, 3, padding=1), *bn_relu2(256),
            nn.Conv2d(256, 256, 3, padding=1), *bn_relu2(256), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(256, 512, (5, 4)), *bn_relu2(512),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        # video: (B, 3, 5, 224, 224) -> (B, 512, 1, 1, 1)
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, (5, 7, 7), stride=(1, 2, 2)), *bn_relu3(96), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), *bn_relu3(256),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), *bn_relu3(256),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), *bn_relu3(256),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), *bn_relu3(256), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(256, 512, (1, 6, 6)), *bn_relu3(512),
        )

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 13, 20)`` MFCC windows (of int16-scaled audio) -> ``(B, 1024)``."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_video(self, faces: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 5, 224, 224)`` BGR face crops, 0..255 -> ``(B, 1024)``."""
        return self.netfclip(self.netcnnlip(faces).flatten(1))

    def forward(self, faces: torch.Tensor, mfcc: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(self.embed_video(faces) - self.embed_audio(mfcc), dim=-1)

    @classmethod
    def from_official(cls, path: str | Path) -> "OfficialSyncNet":
        """Load the released ``syncnet_v2.model`` (a pickled state dict) with ``weights_only=True``.

        Every parameter and buffer must be present with its shape; only BatchNorm's
        ``num_batches_tracked`` counters (absent from state dicts of old PyTorch) may be missing.
        """
        path = Path(path)
        if not path.is_file():
            raise McdmError(f"data.syncnet.weights: {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
            raise McdmError(f"data.syncnet.weights: {path}: cannot load with weights_only=True: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
        if not isinstance(state, dict):
            raise McdmError(f"data.syncnet.weights: {path}: expected a state dict, found {type(state).__name__}")
        state = {k.removeprefix("__S__."): v for k, v in state.items()}
        model = cls()
        own = model.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if unexpected or missing or wrong:
            raise McdmError(f"data.syncnet.weights: {path}: not the official SyncNet layout "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
        for name in set(own) - set(state):  # num_batches_tracked only
            state[name] = own[name]
        model.load_state_dict(state, strict=True)
        return model.eval()


SYNCNET_CLASSES = {cls.__name__: cls for cls in (SyncNet, OfficialSyncNet)}


def load_syncnet(path: str | Path) -> SyncNet | OfficialSyncNet:
    """A SyncNet in eval mode from a ``save_pretrained`` folder (either class) or an official
    ``syncnet_v2.model`` file; every key must match (no missing or unexpected weights)."""
    path = Path(path)
    if path.is_file():
        return OfficialSyncNet.from_official(path)
    config = path / "config.json"
    if not config.is_file():
        raise McdmError(f"{path}: not a SyncNet folder (no config.json; run `mcdm syncnet-train` first)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in SYNCNET_CLASSES:
        raise McdmError(f"{config}: _class_name {name!r} is not one of {sorted(SYNCNET_CLASSES)}")
    model, info = SYNCNET_CLASSES[name].from_pretrained(path, output_loading_info=True, use_safetensors=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise McdmError(f"{path}: SyncNet weights do not match its config: {bad}")
    return model.eval()
