"""Errors that the CLI prints as one line (no traceback): bad input, missing prerequisites."""


class McdmError(RuntimeError):
    """An expected failure with a one-line, user-facing message."""


class MissingStageOutput(McdmError):
    """A stage ran before the stage that makes its input."""

    def __init__(self, path, stage: str):
        super().__init__(f"missing {path}: run `dvc repro {stage}` first")
