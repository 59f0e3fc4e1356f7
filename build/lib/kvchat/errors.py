"""The one error family whose messages are meant for the user."""


class KvchatError(Exception):
    """A problem the user caused or can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 1


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ConfigError(KvchatError):
    """An invalid setting in config.toml or on the command line."""

    exit_code = 2


class InputError(KvchatError):
    """User input that cannot be sent to the model (empty, binary, too long)."""

    exit_code = 1
