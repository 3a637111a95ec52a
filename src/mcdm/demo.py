"""`mcdm demo`: the web demo (Gradio), what EchoMimic, Hallo and LivePortrait ship. Upload a portrait and
speech (or record it), choose the checkpoint (the one given and every alias of the registered model),
seconds, steps and seed; the page shows the progress and plays the video that
:func:`mcdm.pipelines.video.generate_video` writes, as ``mcdm generate`` would.

Offline and local by default: it binds 127.0.0.1, never opens a share link, sends no analytics (set
before gradio is imported), renders without SSR. A bad input is the one-line error of ``mcdm generate``
in the page (gradio's image component reads the upload before the handler: :func:`readable_image`).

    app = build(DemoSettings(checkpoint="models:/mcdm-talkingface@champion"))
    app.launch(server_name="127.0.0.1", ...)   # or: mcdm demo --checkpoint ...
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

for _key, _value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_key, _value)  # before gradio is imported: no version check, no telemetry

import gradio as gr  # noqa: E402
from PIL import UnidentifiedImageError  # noqa: E402

from mcdm.config import Params  # noqa: E402
from mcdm.config.generation import GenerationSettings  # noqa: E402
from mcdm.errors import McdmError  # noqa: E402
from mcdm.pipelines.device import place, placement  # noqa: E402
from mcdm.pipelines.loading import load_pipeline, needs_params  # noqa: E402
from mcdm.pipelines.mcdm import MCDMPipeline  # noqa: E402
from mcdm.pipelines.video import generate_video  # noqa: E402
from mcdm.tracking.registry import registry_aliases, resolve_checkpoint  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    checkpoint: str = "models"
    params: Optional[Params] = None  # needed only for a models/ folder
    registry_name: str = "mcdm-talkingface"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    seconds: float = 4.0
    out_dir: Optional[Path] = None  # where the videos go (default: a temporary folder)


class Checkpoints:
    """Pipelines by checkpoint, each loaded on first use and kept."""

    def __init__(self, settings: DemoSettings):
        self.settings, self.loaded = settings, {}

    def choices(self) -> list[str]:
        return list(dict.fromkeys([self.settings.checkpoint, *registry_aliases(self.settings.registry_name)]))

    def __call__(self, checkpoint: str) -> MCDMPipeline:
        if checkpoint not in self.loaded:
            folder = resolve_checkpoint(checkpoint)
            params = self.settings.params if needs_params(folder) else None
            pipe = load_pipeline(folder, params)
            pipe.set_progress_bar_config(disable=True)
            place(pipe, placement(self.settings.generation.device, self.settings.generation.dtype))
            self.loaded[checkpoint] = pipe
        return self.loaded[checkpoint]


def readable_image(component: gr.Image) -> gr.Image:
    """``component`` whose unreadable upload (a text file named .png) is the one-line error in the page,
    not gradio's bare "Error" (its preprocess opens the file before any handler runs)."""
    original = component.preprocess

    @functools.wraps(original)
    def preprocess(payload):
        try:
            return original(payload)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"portrait {name}: cannot read the image ({type(err).__name__}); a PNG or JPEG is "
                           "expected", print_exception=False) from None

    component.preprocess = preprocess
    return component


def build(settings: DemoSettings) -> gr.Blocks:
    """The demo's page (not launched)."""
    checkpoints = Checkpoints(settings)
    out_dir = settings.out_dir or Path(tempfile.mkdtemp(prefix="mcdm-demo-"))
    limit = settings.generation.demo_max_seconds

    def generate(portrait, speech, checkpoint, seconds, steps, seed, progress=gr.Progress()):
        if not portrait:
            raise gr.Error("portrait: upload an image (PNG or JPEG)", print_exception=False)
        if not speech:
            raise gr.Error("speech: upload or record the audio to speak", print_exception=False)
        try:
            pipe = checkpoints(checkpoint)
            out = Path(tempfile.mkdtemp(prefix="video-", dir=out_dir)) / "talk.mp4"
            progress(0, desc="preparing")
            result = generate_video(pipe, portrait, speech, out, settings=settings.generation, seconds=float(seconds),
                                    steps=int(steps) or None, seed=int(seed),
                                    progress=lambda done, total: progress(done / total, desc=f"frame {done}/{total}"))
        except McdmError as err:
            raise gr.Error(str(err).replace(f"{Path(tempfile.gettempdir())}{os.sep}", ""),
                           print_exception=False) from None
        log.info(result.line())
        return str(out), f"{result.line()}\n{result.speech.line()}"

    with gr.Blocks(title="MCDM talking face") as app:
        gr.Markdown("# MCDM talking face\nA portrait and speech in, the portrait speaking out.")
        with gr.Row():
            with gr.Column():
                portrait = readable_image(gr.Image(type="filepath", label="Portrait", elem_id="portrait"))
                speech = gr.Audio(type="filepath", sources=["upload", "microphone"], label="Speech", elem_id="speech")
                choices = checkpoints.choices()
                checkpoint = gr.Dropdown(choices, value=choices[0], label="Checkpoint", elem_id="checkpoint")
                seconds = gr.Slider(0.2, limit, value=min(settings.seconds, limit), step=0.2, label="Seconds",
                                    elem_id="seconds")
                steps = gr.Slider(0, 50, value=0, step=1, label="Steps per clip (0: the checkpoint's)")
                seed = gr.Number(0, precision=0, label="Seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Video", elem_id="video", format="mp4")
                report = gr.Textbox(label="Report", lines=3, elem_id="report")
        button.click(generate, [portrait, speech, checkpoint, seconds, steps, seed], [video, report],
                     concurrency_limit=1)
    return app.queue(max_size=8)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve ``app`` on ``host:port`` (no share link, no SSR, no monitoring); ``block=False`` returns at once
    (``app.close()`` stops it)."""
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               show_error=False, ssr_mode=False, enable_monitoring=False, inbrowser=False)
    return app
