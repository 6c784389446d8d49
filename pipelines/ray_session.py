"""Ray's session: join a cluster or start a local Ray, always with token authentication.

- :func:`ray_session` joins the cluster named by ``RAY_ADDRESS`` / ``tune.address``, or starts a local
  Ray with the configured CPUs/GPUs, and shuts down only what it started. Ray always runs with token
  authentication (``RAY_AUTH_MODE=token``): Ray's ports listen on all interfaces, and the token is what keeps
  other hosts from running code on it. A local Ray gets a fresh random token per session unless
  ``RAY_AUTH_TOKEN`` is set; joining a cluster needs its token (``RAY_AUTH_TOKEN``, the file named by
  ``RAY_AUTH_TOKEN_PATH``, or Ray's default ``~/.ray/auth_token``). A cluster that is unreachable (checked
  with a plain TCP connection within ``tune.connect_timeout``), a missing token or a refused one is a
  :class:`pipelines.ServiceError` (one line, exit 3), not Ray's retries for ~14 minutes and a traceback.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import ray

from pipelines import ServiceError
from pipelines.settings import Settings, terminate_as_interrupt


_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


@contextlib.contextmanager
def ray_session(settings: Settings) -> Iterator[dict]:
    """Connect to a cluster (RAY_ADDRESS or tune.address) or start a local Ray, with token authentication in
    both cases; yields its resources. ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` are set for the session (Ray's
    processes, started from this one, inherit them) and restored afterwards."""
    if ray.is_initialized():  # someone else's session: use it, leave it as it is
        yield ray.cluster_resources()
        return
    from_env = bool(os.environ.get("RAY_ADDRESS"))
    address = os.environ.get("RAY_ADDRESS") or settings.tune.address
    saved = {k: os.environ.get(k) for k in _AUTH_ENV}
    sigterm = signal.getsignal(signal.SIGTERM)  # before ray.init replaces it
    try:
        os.environ["RAY_AUTH_MODE"] = "token"
        if address:
            source = "RAY_ADDRESS" if from_env else "tune.address"
            check_reachable(address, settings.tune.connect_timeout, source)  # first: nothing there is the likelier fault
            _require_token(address, source)
            _reload_ray_auth()
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ray.exceptions.AuthenticationError) as err:
                ray.shutdown()
                reason = " ".join((getattr(err, "message", None) or str(err) or type(err).__name__).split())
                raise ServiceError(
                    f"could not join the Ray cluster at {address} ({source}): {reason.rstrip('.')}; it accepts "
                    "connections, so the usual cause is a token that is not the cluster's (else the address is not "
                    "a Ray head's port): set RAY_AUTH_TOKEN to the one its nodes were started with "
                    "(`ray get-auth-token` on the head node prints it)") from None
        else:
            if not os.environ.get("RAY_AUTH_TOKEN"):  # a token for this run only: nobody else knows it
                os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            _reload_ray_auth()
            # address="local": never attach to a stale cluster file left by an earlier `ray stop`
            ray.init(address="local", num_cpus=settings.tune.num_cpus, num_gpus=settings.tune.num_gpus,
                     include_dashboard=False, log_to_driver=False)
        # ray.init replaces the SIGTERM handler with one that exits 1 on the spot: trial runs then ended KILLED
        # with "SystemExit", the parent FAILED, and the stage exited 255. SIGTERM takes the SIGINT path again
        # (Ray Tune stops its trials and saves its state; the stage exits 130 and the next run resumes).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, terminate_as_interrupt)
        try:
            yield ray.cluster_resources()
        finally:
            ray.shutdown()
    finally:
        if threading.current_thread() is threading.main_thread() and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE into its config and caches the token once per process: make it read the
    environment again (a second session in one process has another token)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token auth (older) or with these renamed: nothing cached to drop
        return
    Config.initialize("")  # config first: a draining thread must not reload a token in a stale mode
    AuthenticationTokenLoader.instance().reset_cache()


def _require_token(address: str, source: str) -> None:
    """Joining a cluster needs its token where Ray looks for it (highest first): RAY_AUTH_TOKEN, the file
    RAY_AUTH_TOKEN_PATH names (Ray aborts the process when that file is missing or empty), ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var).expanduser() if path_var else Path.home() / ".ray" / "auth_token"
    try:
        if path.read_text().strip():
            return
        problem = f"{path} is empty"
    except OSError as err:
        problem = f"{path}: {err.strerror or err}"
    where = f"RAY_AUTH_TOKEN_PATH={path_var} ({problem})" if path_var else f"no RAY_AUTH_TOKEN and no {path}"
    raise ServiceError(f"the Ray cluster at {address} ({source}) needs its token, and there is none here: {where}; "
                       "set RAY_AUTH_TOKEN to the token its nodes were started with (`ray get-auth-token` on "
                       "the head node prints it) or set tune.address: null for a local Ray")


def _resolve(address: str) -> tuple[str, int] | None:
    """host, port of a Ray address: ``host:port``, ``[v6]:port``, ``ray://host:port`` (Ray Client); ``auto`` as
    ray.init resolves it (RAY_ADDRESS, Ray's current-cluster file, a running local GCS). None when ``auto``
    cannot be resolved with this Ray's internals (renamed): the check is then skipped and ray.init decides."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:
            return None
        try:
            resolved = canonicalize_bootstrap_address("auto")
        except ConnectionError:  # Ray's words: "Could not find any running Ray instance"
            raise ServiceError("no Ray cluster found for address auto (no running cluster on this machine and "
                               "no current-cluster file): start it (`ray up ray_cluster.yaml` / `ray start "
                               "--head`) or set tune.address: null for a local Ray") from None
        except Exception:  # noqa: BLE001 — Ray's internals changed: let ray.init resolve and report
            return None
        if not resolved:
            return None
        address = resolved
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ServiceError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379) or auto")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float, source: str = "tune.address") -> None:
    """Fail fast where nothing answers: ray.init given an address where nothing listens retries for ~14 minutes
    (and reports the machine's own IP for a loopback address). A TCP connection to the address's host:port must
    succeed within ``timeout`` seconds, else a :class:`ServiceError` naming the address and what to do."""
    target = _resolve(address)
    if target is None:
        return
    host, port = target
    shown = address if address != "auto" else f"auto ({host}:{port})"
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.timeout:
        why = "no answer"
    except socket.gaierror as err:
        why = f"host not found: {err.strerror}"
    except OSError as err:
        why = (err.strerror or str(err)).lower()
    raise ServiceError(f"Ray cluster at {shown} ({source}) is not reachable ({why} after "
                       f"{time.monotonic() - t0:.1f} s; tune.connect_timeout {timeout:g} s): start it "
                       "(`ray up ray_cluster.yaml` / `ray start --head`) or set tune.address: null for a local Ray"
                       + ("; RAY_ADDRESS overrides tune.address: unset it" if source == "RAY_ADDRESS" else ""))
