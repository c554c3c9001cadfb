"""One hierarchy of errors for the safe.

Every error a user can cause or meet is a ``SafeError``. Like borg's errors, each class carries
what the CLI needs to report it:

- its **message**: ``str(e)`` is the one line the CLI prints after ``pointsafe: error:``. The
  raiser usually gives a specific line (``PointNotFound("no point with id 'ab12'")``); raised
  without one, the first line of the class docstring is the message, so that line is written
  as a message (lower case, no final full stop) and says what the error means;
- its **exit code** (``exit_code``): 1 for every class here. The CLI contract has one code for
  errors (0 ok, 1 error, 3 finished with warnings; see ``pointsafe --help``); the message, not
  the code, says which error it was;
- whether it is a **usage error** (``usage``): a mistake in what the user asked for (a bad
  argument, an unknown point, a path that is not in the point), found while the command checks
  its input, *before it changes anything*. The task history records such a command as refused
  ("usage"), with no alert (ops/recorder.py). A room that has started real work (writing packs,
  restoring files) must not raise a usage class for what goes wrong then: a failure there is a
  real error and alerts.

Anything else that escapes a command (AttributeError, KeyError, TypeError...) is a bug in
pointsafe, and the CLI reports it as one, with its traceback in a log (cli/main.py).
"""

from __future__ import annotations

from typing import ClassVar


class SafeError(Exception):
    """pointsafe could not do what was asked

    Base of every error pointsafe reports to a user; ``str(e)`` is the one line.
    """

    exit_code: ClassVar[int] = 1
    usage: ClassVar[bool] = False

    def __init__(self, message: str | None = None, *args: object) -> None:
        super().__init__(self.default_message() if message is None else message, *args)

    @classmethod
    def default_message(cls) -> str:
        """The first line of the class docstring: the message when none is given."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else cls.__name__


class NotASafe(SafeError):
    """not a pointsafe safe

    The path is missing, empty, foreign or truncated, or its header or index cannot be read.
    Not a usage error: a mistyped ``--safe`` is never recorded (there is no index to record it
    in), so a NotASafe that reaches the task history is a safe that exists and is damaged,
    which an administrator must hear about.
    """


class UnsupportedVersion(SafeError):
    """the safe was written by a newer pointsafe"""


class SafeLocked(SafeError):
    """another process holds the safe's writer lock"""


class ObjectMissing(SafeError):
    """an object the caller asked for is not in the index"""


class IntegrityError(SafeError):
    """stored bytes do not match their checksum or key

    Never returned as data; ``pack`` and ``offset`` say where, when known.
    """

    def __init__(self, message: str | None = None, pack: int | None = None, offset: int | None = None):
        super().__init__(message)
        self.pack = pack
        self.offset = offset


class DiskFull(SafeError):
    """the safe's filesystem is full

    The last batch was not committed.
    """


class QuotaExceeded(SafeError):
    """the safe's filesystem fell below its hard quota of free space

    The writer stopped before writing more (the uncommitted batch is abandoned; gc reclaims
    what was written).
    """


class PointNotFound(SafeError):
    """no point matches the POINT given

    A usage error: the user named a point that is not there.
    """

    usage = True


class UsageError(SafeError):
    """bad command line

    A bad argument, path or combination given by the user, found before any work starts.
    """

    usage = True


class NeedsPassword(SafeError):
    """the safe is encrypted: give its password (POINTSAFE_PASSWORD, --password-file, --password-command)

    Raised when an encrypted safe is opened without a password or key.
    """


class WrongPassword(SafeError):
    """wrong password (no key slot of the safe opens with it)

    Nothing was written.
    """
