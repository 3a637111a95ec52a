"""`mcdm demo`: the Gradio web demo (:mod:`mcdm.demo`) on 127.0.0.1 until Ctrl-C."""
from __future__ import annotations

import logging

from mcdm.commands.args import Command, optional, positive_seconds
from mcdm.config import load_params
from mcdm.config.generation import GenerationSettings
from mcdm.demo import DemoSettings, build, launch
from mcdm.errors import McdmError
from mcdm.pipelines.device import placement

log = logging.getLogger(__name__)


def run(_, args) -> int:
    if not 0 < args.port < 65536:
        raise McdmError(f"--port {args.port}: a port is 1 to 65535")
    generation = GenerationSettings(**({"device": args.device} if args.device else {}))
    placement(generation.device, generation.dtype)  # a device that is not there: one line, before anything loads
    params = load_params(args.params) if args.params else None
    if params is None and args.checkpoint == "models":
        params = load_params("params.yaml")  # this repo's stages: the params they were trained with
    app = build(DemoSettings(checkpoint=args.checkpoint, params=params, seconds=args.seconds or 4.0,
                             generation=generation))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(f"--host {args.host}: the demo is reachable from other machines; it has no authentication")
    log.info(f"demo at http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    launch(app, args.host, args.port)
    return 0


COMMAND = Command(run, (
    optional("--checkpoint", "the default checkpoint (models/ folder, bundle, pipeline folder or models:/name@alias); "
                             "the page also lists every alias of the registered model", default="models"),
    optional("--host", "address to bind (default 127.0.0.1: this machine only)", default="127.0.0.1"),
    optional("--port", "port (default 7860)", type=int, default=7860),
    optional("--seconds", "the seconds slider's start value", type=positive_seconds),
    optional("--device", "auto (CUDA when present), cpu, cuda or cuda:N"),
), needs_params=False, params_file_optional=True)
