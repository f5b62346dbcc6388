"""Token extraction and JWT verification (protocol §1).

Every refusal is an ``AuthError`` whose ``reason`` starts with ``Unauthorized`` and names the cause, so
the browser (which cannot read an HTTP 403) sees it in the 1008 close frame.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import time
import warnings
from collections.abc import Mapping
from urllib.parse import parse_qs

import jwt
import orjson
from jwt.algorithms import HMACAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

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
    fast: bool = True,
) -> tuple[str, dict]:
    """Verify ``token`` and return ``(user_id, claims)``; raise ``AuthError`` otherwise.

    The common token (HS256, canonical encoding) is checked by ``fast_claims``; anything it is not
    sure about goes to PyJWT, whose verdict then decides. ``fast=False``: PyJWT alone.
    """
    if not token:
        raise AuthError("no_token", "no token (send ?token=JWT or Authorization: Bearer JWT)")
    claims = fast_claims(token, secret, issuer, audience, leeway) if fast else None
    if claims is None:
        claims = pyjwt_claims(token, secret, issuer, audience, leeway)
    return user_of(claims), claims


#: ``verify_token`` with PyJWT alone: the reference the fast path is tested against.
verify_token_pyjwt = functools.partial(verify_token, fast=False)


def user_of(claims: dict) -> str:
    """The user a verified token speaks for: its ``userId`` claim, else its ``sub``."""
    user_id = claims.get("userId") or claims.get("sub")
    if user_id is None or isinstance(user_id, (dict, list, bool)) or str(user_id) == "":
        raise AuthError("invalid_claims", "token has no userId or sub claim")
    return str(user_id)


def pyjwt_claims(token: str, secret: str, issuer: str | None, audience: str | None, leeway: float) -> dict:
    """The claims PyJWT verifies, each of its refusals told as an ``AuthError``."""
    options = {"require": ["exp"], "verify_aud": audience is not None}
    try:
        return jwt.decode(
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


# -- the fast path: PyJWT redoes on every decode what does not change between connects (option
# merging, checking the secret is not a PEM/DER/JWK key, header machinery); for the one token shape
# the web app signs, the same verdict needs only an HMAC, a base64 decode and a JSON parse.

#: The header segments the fast path takes, exactly as encoded (PyJWT's, jsonwebtoken's, jose's): any
#: other header, even an equivalent one, goes to PyJWT.
_FAST_HEADERS = frozenset(
    base64.urlsafe_b64encode(header).rstrip(b"=")
    for header in (b'{"alg":"HS256","typ":"JWT"}', b'{"typ":"JWT","alg":"HS256"}', b'{"alg":"HS256"}')
)
#: orjson reads integers beyond 64 bits as floats where json (PyJWT) keeps them exact: a payload that
#: could hold one (a float or a container among the claims) and has 19 digits in a row goes to PyJWT.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_MAY_HIDE_BIG_INTS = (float, list, dict)
#: The signature segment of HS256: 32 bytes, 43 base64url characters.
_SIG_CHARS = 43
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
#: Reads the clock as PyJWT does (epoch seconds); a name the tests can replace.
_clock = time.time


@functools.lru_cache(maxsize=8)
def _hmac_for(secret: str) -> hmac.HMAC | None:
    """The HMAC-SHA256 state keyed with ``secret``, copied per token; None when PyJWT refuses the key.

    PyJWT refuses an empty key or one that looks asymmetric (PEM, SSH, DER, JWK) with an error that
    is not a token verdict, so such a secret always takes the PyJWT path and keeps that behaviour.
    """
    algorithm = HMACAlgorithm(HMACAlgorithm.SHA256)
    try:
        key = algorithm.prepare_key(secret)
    except Exception:  # whatever PyJWT raises for this key, it keeps raising on its own path
        return None
    short = algorithm.check_key_length(key)
    if short:  # PyJWT warns of a short key on every decode; the fast path warns once per secret
        warnings.warn(short, InsecureKeyLengthWarning, stacklevel=2)
    return hmac.new(key, digestmod=hashlib.sha256)


def _b64_canonical(segment: bytes) -> bytes | None:
    """The bytes of an unpadded, canonical base64url ``segment``; None for anything else."""
    pad = -len(segment) % 4
    if pad == 3:
        return None
    try:
        raw = binascii.a2b_base64(segment.translate(_FROM_URLSAFE) + b"=" * pad)
    except binascii.Error:
        return None
    # Re-encoding catches what the lenient decoder skips (stray characters, "+", "/", padding, non-zero
    # spare bits): PyJWT refuses all of them, so only the one canonical spelling stays on this path.
    if binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=") != segment:
        return None
    return raw


def _int_claim(value: object) -> int | None:
    """``int(value)`` as PyJWT takes a time claim, for the plain number types; None for the rest."""
    if type(value) is int:
        return value
    if type(value) is float:  # orjson never yields inf or nan, so int() cannot fail here
        return int(value)
    return None


def fast_claims(
    token: str, secret: str, issuer: str | None, audience: str | None, leeway: float
) -> dict | None:
    """The claims of an ordinary HS256 token, or an ``AuthError`` with PyJWT's verdict; None: ask PyJWT.

    Only returns or raises where PyJWT would do the same; every check runs in PyJWT's order so the
    first failure is the one PyJWT reports.
    """
    base = _hmac_for(secret) if type(secret) is str else None
    if base is None or type(token) is not str or not token.isascii():
        return None
    if type(leeway) not in (int, float) or not (audience is None or type(audience) is str):
        return None
    if not (issuer is None or type(issuer) is str):
        return None
    raw = token.encode("ascii")
    parts = raw.split(b".")
    if len(parts) != 3 or parts[0] not in _FAST_HEADERS:
        return None
    payload = _b64_canonical(parts[1])
    if payload is None:
        return None
    mac = base.copy()
    mac.update(raw[: len(parts[0]) + 1 + len(parts[1])])
    expected = binascii.b2a_base64(mac.digest(), newline=False)[:_SIG_CHARS].translate(_TO_URLSAFE)
    if not hmac.compare_digest(expected, parts[2]):
        if len(parts[2]) == _SIG_CHARS and _b64_canonical(parts[2]) is not None:
            raise AuthError("bad_signature", "invalid token signature")
        return None  # padded or odd signatures: PyJWT decides
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(claims) is not dict:
        return None
    for value in claims.values():
        if type(value) in _MAY_HIDE_BIG_INTS:
            if _LONG_DIGITS.search(payload):
                return None
            break
    return _checked(claims, issuer, audience, leeway)


def _checked(claims: dict, issuer: str | None, audience: str | None, leeway: float) -> dict | None:
    """``claims`` after PyJWT's claim checks under ``pyjwt_claims``' options, in PyJWT's order."""
    if claims.get("exp") is None:
        raise AuthError("invalid_claims", "token has no exp claim")
    now = _clock()
    # A time claim that is not a plain number (a string, a boolean, a list) is PyJWT's to judge.
    if "iat" in claims:
        iat = _int_claim(claims["iat"])
        if iat is None:
            return None
        if iat > (now + leeway):
            raise AuthError("invalid_claims", "token not yet valid")
    if "nbf" in claims:
        nbf = _int_claim(claims["nbf"])
        if nbf is None:
            return None
        if nbf > (now + leeway):
            raise AuthError("invalid_claims", "token not yet valid")
    exp = _int_claim(claims["exp"])
    if exp is None:
        return None
    if exp <= (now - leeway):
        raise AuthError("expired", "token expired")
    if issuer is not None:
        if "iss" not in claims:
            raise AuthError("invalid_claims", "token has no iss claim")
        if type(claims["iss"]) is not str or claims["iss"] != issuer:
            raise AuthError("invalid_claims", "token issuer not accepted")
    if audience is not None:
        if not claims.get("aud"):
            raise AuthError("invalid_claims", "token has no aud claim")
        if type(claims["aud"]) is not str:
            return None  # audience lists: PyJWT decides
        if claims["aud"] != audience:
            raise AuthError("invalid_claims", "token audience not accepted")
    if not isinstance(claims.get("sub", ""), str) or not isinstance(claims.get("jti", ""), str):
        raise AuthError("malformed", "malformed token")
    return claims


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
