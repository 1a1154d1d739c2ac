"""Exception types of the public API. Each message is one line a user can act on."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors that
    quote what a library raised."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class CamelidError(Exception):
    """Base of every error camelid raises on purpose."""


class ModelNotFoundError(CamelidError, FileNotFoundError):
    """A model name that is not in the store or registry, or a path that does not exist."""


class FormatError(CamelidError, ValueError):
    """A model file or folder that is truncated, corrupt or inconsistent."""


class UnsupportedModelError(CamelidError, ValueError):
    """A well-formed file of an architecture or tensor type camelid does not run."""


class ContextLengthError(CamelidError, ValueError):
    """A prompt (plus the tokens asked for) that does not fit the context window."""


class SamplingError(CamelidError, ValueError):
    """Invalid sampling or generation parameters."""


class StoreError(CamelidError):
    """Fetching, verifying or removing a model in the store failed."""


class DataError(CamelidError, ValueError):
    """A training data file or record that cannot be used (named by FILE:LINE where there is one)."""
