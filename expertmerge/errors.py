"""The one error type users see: it names the file or key at fault and what to do about it."""


class ExpertMergeError(Exception):
    """Bad input detected before (or instead of) heavy work. The CLI prints it without a traceback."""
