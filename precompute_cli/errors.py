"""The two kinds of failure the CLI tells apart, and their exit codes (listed in the README)."""


class PrecomputeError(Exception):
    """Something went wrong that is ours to explain; the message is one sentence for the user."""

    exit_code = 1


class InputError(PrecomputeError):
    """The input is wrong or is something we refuse to convert (exit 2)."""

    exit_code = 2
