"""Token extraction and JWT verification (protocol §1).

Every refusal is an ``AuthError`` whose ``reason`` starts with ``Unauthorized`` and names the cause, so
the browser (which cannot read an HTTP 403) sees it in the 1008 close frame.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import parse_qs

import jwt

from fonana_ws.config import Settings

ALGORITHM = "HS256"


class AuthError(Exception):
    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        #: A short machine name of the cause, used as a metrics label.
        self.cause = cause
        self.reason = f"Unauthorized: {detail}"


def bearer(authorization: str) -> str:
    """The credential of an ``Authorization: Bearer <credential>`` header; "" for any other header."""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return ""


def api_key_matches(authorization: str, key: str | None) -> bool:
    """True when the header carries ``key`` as its Bearer credential (compared in constant time)."""
    given = bearer(authorization)
    return bool(key and given and hmac.compare_digest(given.encode(), key.encode()))


def token_from_scope(query_string: bytes, headers: Mapping[str, str], subprotocols: list[str]) -> str | None:
    """The token from ``?token=``, then ``Authorization: Bearer``, then a ``Sec-WebSocket-Protocol`` entry.

    The subprotocol form is ``bearer.<JWT>`` or a bare JWT-looking entry, for clients that cannot set
    headers and do not want the token in a URL.
    """
    query = parse_qs(query_string.decode("latin-1"))
    if query.get("token") and query["token"][0]:
        return query["token"][0]
    token = bearer(headers.get("authorization", ""))
    if token:
        return token
    for proto in subprotocols:
        if proto.startswith("bearer."):
            return proto[len("bearer.") :]
        if proto.count(".") == 2 and proto.startswith("eyJ"):
            return proto
    return None


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, safe to log."""
    return hashlib.sha256(token.encode()).hexdigest()[:10]


def verify_token(
    token: str | None,
    secret: str,
    *,
    issuer: str | None = None,
    audience: str | None = None,
    leeway: float = 30.0,
) -> tuple[str, dict]:
    """Verify ``token`` and return ``(user_id, claims)``; raise ``AuthError`` otherwise."""
    if not token:
        raise AuthError("no_token", "no token (send ?token=JWT or Authorization: Bearer JWT)")
    options = {"require": ["exp"], "verify_aud": audience is not None}
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            options=options,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "token expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError("invalid_claims", f"token has no {exc.claim} claim") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature", "invalid token signature") from None
    except jwt.InvalidIssuerError:
        raise AuthError("invalid_claims", "token issuer not accepted") from None
    except jwt.InvalidAudienceError:
        raise AuthError("invalid_claims", "token audience not accepted") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("invalid_claims", "token not yet valid") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("bad_signature", f"token algorithm not accepted (only {ALGORITHM})") from None
    except jwt.InvalidTokenError:
        raise AuthError("malformed", "malformed token") from None
    user_id = claims.get("userId") or claims.get("sub")
    if user_id is None or isinstance(user_id, (dict, list, bool)) or str(user_id) == "":
        raise AuthError("invalid_claims", "token has no userId or sub claim")
    return str(user_id), claims


def verify_with(settings: Settings, token: str | None) -> tuple[str, dict]:
    """``verify_token`` under the server's settings: its secret, issuer, audience and leeway."""
    return verify_token(
        token,
        settings.jwt_secret,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway=settings.jwt_leeway,
    )


def create_token(
    secret: str,
    user_id: str,
    expires_in: float = 3600,
    *,
    extra: Mapping[str, object] | None = None,
) -> str:
    """A token this server accepts (what the web app signs), for the CLI and the tests."""
    now = int(time.time())
    claims: dict[str, object] = {"userId": user_id, "iat": now, "exp": now + int(expires_in)}
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
