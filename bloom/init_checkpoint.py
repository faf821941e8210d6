"""TODO(init_checkpoint): being written.

Placeholder so that bloom/cli.py can register the subcommand; replaced by the real module."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise NotImplementedError("init_checkpoint: not written yet")
