"""User-facing errors.

Every problem a user can cause (bad path, bad TP degree, bad sampling value, ...) raises
`WeavelmError` with a one-line message that names the problem and the fix. The CLI prints that
line and exits with status 2 instead of showing a traceback.
"""


class WeavelmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check(condition: bool, message: str) -> None:
    """Raise `WeavelmError(message)` unless `condition` holds."""
    if not condition:
        raise WeavelmError(message)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a service manager sends), handled like Ctrl-C: every rank is stopped."""


def raise_terminated(signum=None, frame=None):
    """A SIGTERM handler (the CLI installs it): raise `Terminated` in the main thread."""
    raise Terminated()
