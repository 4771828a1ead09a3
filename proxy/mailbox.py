"""Where a session's server backend reads the proxy's answers to the calls it evaluates: a large
object (its OID), and the secret the answers are signed with. The proxy tells the backend, and nobody
else, with a start-up parameter (see intercept/servercalls.py)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

#: The start-up parameter the proxy adds for the backend: "OID SECRET".
MAILBOX_SETTING = "azure_local_ai.proxy_session"
_FIRST_OID = 1 << 31  # mailboxes take OIDs from the top half, far from those the server hands out


@dataclass(frozen=True)
class Mailbox:
    oid: int
    secret: str

    @classmethod
    def new(cls) -> Mailbox:
        return cls(_FIRST_OID + secrets.randbelow((1 << 31) - 2), secrets.token_hex(16))

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
