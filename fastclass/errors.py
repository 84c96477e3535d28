"""Error types the services raise; the CLI prints their message as one `Error: ...` line and exits 1."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" for none): a one-line reason for a log or a record."""
    return (str(exc).splitlines() or [""])[0]


class FastclassError(Exception):
    """A problem the user can fix; the message says how."""


class NotFoundError(FastclassError):
    """A named thing (folder, label, image, job) does not exist."""


class StopRequested(Exception):
    """A worker shutting down asked the job to stop (not a failure); what the job did so far is kept."""
