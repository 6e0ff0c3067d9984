"""The one exception type a user can cause: the CLI prints its message and exits with status 2."""


class TripError(Exception):
    """A problem with the user's input or environment. The message names the cause and the fix."""
