"""Where a server backend reads the proxy's answers to the calls it evaluates in a transaction: a large
object (its OID), and the secret the answers are signed with. The transaction's setting
azure_local_ai.proxy_session holds them (see intercept/servercalls.py)."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

_FIRST_OID = 1 << 31  # mailboxes take OIDs from the top half, far from those the server hands out
_LAST_OID = (1 << 32) - 3
_SECRET = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Mailbox:
    oid: int
    secret: str

    @classmethod
    def new(cls) -> Mailbox:
        return cls(_FIRST_OID + secrets.randbelow((1 << 31) - 2), secrets.token_hex(16))

    @classmethod
    def parse(cls, setting: str) -> Mailbox:
        """The mailbox of a setting "OID SECRET" (as a function of extension 1.4 chooses it); ValueError
        for anything else."""
        oid_text, secret = setting.split(" ")
        oid = int(oid_text)
        if not _FIRST_OID <= oid <= _LAST_OID or not _SECRET.fullmatch(secret):
            raise ValueError(f"not a mailbox: {setting!r}")
        return cls(oid, secret)

    @property
    def setting(self) -> str:
        return f"{self.oid} {self.secret}"

    def request_lock_key(self, request_id: str) -> int:
        """The advisory lock of one request (extension 1.3 on): 60 bits of the MD5 of the secret and the
        request's id, as the SQL function computes it. Seen in pg_locks while it is held, it tells
        another role nothing it can use: the next request waits on another."""
        return int(hashlib.md5((self.secret + request_id).encode(), usedforsecurity=False).hexdigest()[:15], 16)

    @property
    def lock_key(self) -> int:
        """The advisory lock the proxy holds while it works out an answer, and the waiting function of
        versions 1.0 to 1.2 waits on (the same for the session's life): 60 bits of the MD5 of the
        secret (the SQL function computes it as ('x' || substr(md5(secret), 1, 15))::bit(60)::bigint)."""
        return int(hashlib.md5(self.secret.encode(), usedforsecurity=False).hexdigest()[:15], 16)
