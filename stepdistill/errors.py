"""User-facing errors: one line that says what was wrong and how to fix it."""


class StepdistillError(Exception):
    """Bad input (config, path, model, data). The CLI prints it as one line, without a traceback."""
