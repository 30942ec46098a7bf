"""What `rnnserve serve` checks before it starts anything: the files its flags name.

A missing certificate or an empty model volume would otherwise surface once per worker, as a
traceback from deep in gRPC's setup or as one error line per worker and then the supervisor's.
Checked once in the parent, each problem is one line that names the flag and what to fix, and
the exit status is 2 (a container then stops instead of restarting into the same failure).
"""

from __future__ import annotations

import os
import stat

from rnnserve.models.repository import scan
from rnnserve.ops.config import ServerConfig


class NotServable(ValueError):
    """The server cannot start as configured; the message says what to change."""


def _readable_file(flag: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise NotServable(
            f"{flag} {path}: cannot read it ({exc.strerror or exc}); mount the "
            "file there or fix the path"
        ) from None


def check(config: ServerConfig) -> None:
    for flag, path in (
        ("--tls-cert", config.tls_cert),
        ("--tls-key", config.tls_key),
        ("--auth-tokens-file", config.auth_tokens_file),
    ):
        if path:
            _readable_file(flag, path)
    root = config.repository
    hint = (
        "mount a model repository (<name>/<version>/model.onnx + model.json) there, "
        "or point --repository (RNNSERVE_REPOSITORY) at one"
    )
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise NotServable(f"--repository {root} is not a directory; {hint}")
        found = scan(root)
    except FileNotFoundError:
        raise NotServable(f"--repository {root} is not a directory; {hint}") from None
    except OSError as exc:
        raise NotServable(
            f"--repository {root}: cannot read it as uid {os.getuid()} "
            f"({exc.strerror or exc}); {hint}"
        ) from None
    held = sorted({name for name, _ in found.found})
    if not held:
        why = "; ".join(f"{path}: {problem}" for path, problem in list(found.problems.items())[:2])
        raise NotServable(
            f"--repository {root} holds no servable model"
            + (f" ({why})" if why else "")
            + f"; {hint}"
        )
    absent = sorted(set(config.models) - set(held))
    if absent and (config.repository_poll == 0 or len(absent) == len(config.models)):
        raise NotServable(
            f"--models names {', '.join(absent)}, which --repository {root} "
            f"does not hold (it holds {', '.join(held)})"
        )
