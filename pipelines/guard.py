"""How a stage ends on a fault: :func:`main_guard` turns bad input into one line and exit status 2, a service
fault into one line and exit status 3, an interrupt (Ctrl-C, SIGINT, SIGTERM) into exit status 130.
(:mod:`pipelines.settings` re-exports it, where every stage imports it from.)"""
from __future__ import annotations

import os
import sys

from pipelines import ParamsError, ServiceError


# Exceptions from these packages are faults of a service (the MLflow store or server, its database, the network),
# not of the code: main_guard reports them in one line. Matched by module, so the guard imports none of them.
SERVICE_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3", "ray")


def _service_fault(err: BaseException) -> bool:
    return isinstance(err, (ServiceError, ConnectionError, TimeoutError)) or any(
        c.__module__.split(".")[0] in SERVICE_MODULES for c in type(err).__mro__ if c not in (Exception, BaseException))


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:400] + " …"


def terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM (what `timeout`, Slurm and Kubernetes send) takes the SIGINT path: runs end KILLED, Ray Tune
    stops its trials and saves its state, and the stage exits 130 as for Ctrl-C. The SIGINT handler is called
    here, not SIGINT re-sent: a process started in the background inherits SIGINT ignored, and would go on."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)  # e.g. Ray Tune's during a search: stop the trials, save the state
    else:
        raise KeyboardInterrupt


def main_guard(fn) -> None:
    """Run a stage's main; a bad-input error becomes one clear line on stderr and exit status 2, a service
    fault (an unreachable or broken MLflow store, Ray cluster, network) one line and exit status 3, an
    interrupt (Ctrl-C, SIGINT from DVC, or SIGTERM) exit status 130, without a traceback.
    ``DEQSM_TRACEBACK=1`` shows the traceback of a fault as well."""
    import signal

    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    show = os.environ.get("DEQSM_TRACEBACK") == "1"
    try:
        fn()
    except (ParamsError, FileNotFoundError, ValueError) as err:
        if show:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run `dvc repro` again to continue", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 — only service faults are answered here; others keep their traceback
        if show or not _service_fault(err):
            raise
        if isinstance(err, ServiceError):  # written for the user: the service, its address, what to do
            print(f"error: {err}", file=sys.stderr)
        else:
            print(f"error: {type(err).__name__}: {_first_line(err)} (set DEQSM_TRACEBACK=1 for the traceback)",
                  file=sys.stderr)
        sys.exit(3)
