"""Who is calling: bearer tokens mapped to client names.

`--auth-tokens-file` holds one `client-name token` pair per line (blank lines and `#` comments
are ignored); the single `--auth-token` is the client named "default". Sessions and v2
sequences belong to the client that opened them, and metrics carry its name: a label bounded by
the file, never by what callers send. Without tokens every caller is the anonymous client "".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from rnnserve.errors import Unauthenticated

DEFAULT_CLIENT = "default"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_TOKEN_LENGTH = 16
BEARER = "bearer "


def _digest(token: str) -> bytes:
    """Tokens are looked up by hash, so the lookup's timing says nothing about a token."""
    return hashlib.sha256(token.encode()).digest()


class Identities:
    def __init__(self, tokens: dict[str, str]) -> None:
        """tokens: token -> client name."""
        self._clients = {_digest(token): name for token, name in tokens.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    @property
    def names(self) -> set[str]:
        return set(self._clients.values())

    @classmethod
    def load(cls, token: str, tokens_file: str) -> Identities:
        tokens = {token: DEFAULT_CLIENT} if token else {}
        if tokens_file:
            for name, secret in parse_tokens(Path(tokens_file)):
                if secret in tokens:
                    raise ValueError(
                        f"{tokens_file}: client {name!r} reuses another client's "
                        "token; every client needs its own"
                    )
                tokens[secret] = name
        return cls(tokens)

    def reload(self, token: str, tokens_file: str) -> bool:
        """Read the tokens again (a rotated file); whether they changed. ValueError, and the
        tokens in force stay, when the file is unreadable or malformed."""
        fresh = Identities.load(token, tokens_file)._clients
        if fresh == self._clients:
            return False
        self._clients = fresh  # one assignment: a call sees the old set or the new one
        return True

    def client(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The calling client's name ("" when auth is off); Unauthenticated otherwise."""
        if not self._clients:
            return ""
        for key, value in metadata or ():
            if (
                key == "authorization"
                and isinstance(value, str)
                and value[: len(BEARER)].lower() == BEARER
            ):
                name = self._clients.get(_digest(value[len(BEARER) :].strip()))
                if name is not None:
                    return name
        raise Unauthenticated(
            "missing or unknown bearer token: send metadata 'authorization: Bearer <token>'"
        )


def parse_tokens(path: Path) -> list[tuple[str, str]]:
    """(client name, token) pairs; ValueError naming the file and line for anything off."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--auth-tokens-file {path}: cannot read it ({exc})") from None
    pairs: list[tuple[str, str]] = []
    names: set[str] = set()
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'client-name token', got {len(fields)} fields")
        name, token = fields
        if not NAME.fullmatch(name):
            raise ValueError(
                f"{where}: client name {name[:64]!r} must be 1-64 letters, digits, '_', '.' or '-'"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_LENGTH} characters"
            )
        if name in names:
            raise ValueError(f"{where}: client {name!r} appears twice")
        names.add(name)
        pairs.append((name, token))
    if not pairs:
        raise ValueError(f"--auth-tokens-file {path}: no 'client-name token' lines")
    return pairs
