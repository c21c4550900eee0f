"""Who may use the console: loopback or a login, password hashes, roles, CSRF tokens and the login rate limit."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import secrets
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

from lpm_node.core.config import ConsoleSettings, ConsoleUser

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    """True for an address (or ``localhost``) that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def login_required(console: ConsoleSettings) -> bool:
    """Off loopback always; on loopback once users are configured."""
    return bool(console.users) or not is_loopback(console.host)


def check_exposure(console: ConsoleSettings) -> None:
    """Refuse to serve off loopback without users to log in (ValueError)."""
    if not is_loopback(console.host) and not console.users:
        raise ValueError(f"[console] host = {console.host!r} is not loopback: configure [console] users (with "
                         "password hashes and roles) so that a login is required, or bind 127.0.0.1")


def verify_password(stored_hash: str, password: str) -> bool:
    """Check ``password`` against an argon2 or bcrypt hash."""
    if stored_hash.startswith("$argon2"):
        from argon2 import PasswordHasher
        from argon2.exceptions import Argon2Error, InvalidHashError

        try:
            return PasswordHasher().verify(stored_hash, password)
        except (Argon2Error, InvalidHashError):
            return False
    if stored_hash.startswith("$2"):
        import bcrypt

        try:
            return bcrypt.checkpw(password.encode()[:72], stored_hash.encode())
        except ValueError:
            return False
    return False


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, checked for unknown names so that a wrong name costs what a wrong password does."""
    from argon2 import PasswordHasher

    return PasswordHasher().hash(secrets.token_hex(16))


def authenticate(users: list[ConsoleUser], name: str, password: str) -> ConsoleUser | None:
    """The user whose name and password these are, or None."""
    user = next((u for u in users if hmac.compare_digest(u.name.encode(), name.encode())), None)
    if user is None:
        verify_password(_dummy_hash(), password)
        return None
    return user if verify_password(user.password_hash, password) else None


class RateLimit:
    """At most ``per_minute`` attempts per key in any minute (thread-safe)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, *keys: str) -> bool:
        """Count one attempt under each key; False when any of them is over its limit."""
        now = time.monotonic()
        allowed = True
        with self._lock:
            for key in keys:
                seen = self._seen[key]
                while seen and now - seen[0] > 60:
                    seen.popleft()
                if len(seen) >= self.per_minute:
                    allowed = False
                seen.append(now)
        return allowed


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


def session_secret(data_dir: Path) -> str:
    """The key that signs session cookies: kept in ``console-secret`` (mode 0600) so logins survive a restart."""
    path = data_dir / "console-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "w") as out:
            out.write(secret)
        return secret
