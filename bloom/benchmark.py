"""TODO(benchmark): being written.

Placeholder so that bloom/cli.py can register the subcommand; replaced by the real module."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise NotImplementedError("benchmark: not written yet")
