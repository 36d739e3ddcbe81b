"""One way every job ends on a user's mistake: a one-line ``error: ...`` and exit code 2.

Bad inputs raise the engine's own error types, each naming the file or key at fault. Raised inside
an actor they reach the driver wrapped in a Ray error whose text is the whole remote traceback;
``user_error`` unwraps them, so a truncated image reads the same whether the driver or an extractor
found it. ``--debug`` prints the traceback as well.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

from anomaly_core.backbones import WeightsError
from anomaly_core.bank import BankError
from anomaly_core.config import ConfigError
from anomaly_core.data import DatasetError
from anomaly_core.training import CheckpointError, ModelFilesError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DatasetError, BankError, WeightsError, ModelFilesError,
                                                CheckpointError)


def user_error(error: BaseException, known: tuple[type[BaseException], ...]) -> BaseException | None:
    """The user-facing error inside ``error`` (itself, or the cause a Ray error carries), else None."""
    cause = getattr(error, "cause", None)
    if type(error).__module__.startswith("ray.") and isinstance(cause, BaseException):
        return user_error(cause, known)
    return error if isinstance(error, known) else None


def run_job(body: Callable[[], object], debug: bool, known: tuple[type[BaseException], ...] = ()) -> int:
    """Run a job's body; map user errors (``USER_ERRORS`` + ``known``) to ``error: ...`` and exit code 2."""
    try:
        body()
    except Exception as error:  # noqa: BLE001 - anything not a user error is re-raised below
        found = user_error(error, USER_ERRORS + known)
        if found is None:
            raise
        if debug:
            traceback.print_exc()
        logging.getLogger("jobs").debug("user error", exc_info=True)
        print(f"error: {found}", file=sys.stderr)
        return 2
    return 0
