"""The HS256 fast path of ``verify_token`` against plain PyJWT: the same verdict for every token.

Each case runs through ``verify_token`` (fast path, PyJWT fallback) and ``verify_token_pyjwt`` (PyJWT
alone) on a frozen clock, and the outcomes (claims, or AuthError cause and reason, or any other
exception's type) must be equal. Coverage checks make sure the common tokens are decided by the fast
path itself, so the equality is not just PyJWT agreeing with itself.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from unittest import mock

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fonana_ws import auth
from fonana_ws.auth import AuthError

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

SECRET = "test-secret-" + "x" * 32
NOW = 1_800_000_000.5
#: (issuer, audience, leeway) the server may run with.
CONFIGS = [
    (None, None, 30.0),
    ("fonana.me", "fonana-websocket", 30.0),
    (None, None, 0.0),
    ("fonana.me", None, 0.5),
    (None, "fonana-websocket", 300.0),
    (None, None, -5.0),  # not a setting the server allows, but verify_token takes it
]
HEADERS = [
    b'{"alg":"HS256","typ":"JWT"}',
    b'{"typ":"JWT","alg":"HS256"}',
    b'{"alg":"HS256"}',
    b'{"alg": "HS256", "typ": "JWT"}',
    b'{"alg":"HS256","typ":"JWT","kid":"k1"}',
    b'{"alg":"HS256","kid":7}',
    b'{"alg":"HS256","crit":["exp"],"exp":1}',
    b'{"alg":"HS256","b64":false,"crit":["b64"]}',
    b'{"alg":"HS256","typ":"jwt"}',
    b'{"alg":"none","typ":"JWT"}',
    b'{"alg":"HS512","typ":"JWT"}',
    b'{"alg":"hs256"}',
    b'{"typ":"JWT"}',
    b'["HS256"]',
    b"",
]


class FrozenDatetime(datetime):
    """PyJWT reads the clock as ``datetime.now(tz=timezone.utc)``."""

    @classmethod
    def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
        return datetime.fromtimestamp(NOW, tz=UTC)


@contextmanager
def frozen() -> Iterator[None]:
    with mock.patch.object(auth, "_clock", lambda: NOW), mock.patch("jwt.api_jwt.datetime", FrozenDatetime):
        yield


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(header: bytes, payload: bytes, secret: str = SECRET, digest: str = "sha256") -> str:
    """A token with exactly these header and payload bytes, signed with ``secret``."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    sig = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(sig)}"


def claims_token(claims: dict, header: bytes = HEADERS[0], secret: str = SECRET) -> str:
    return signed(header, json.dumps(claims, separators=(",", ":")).encode(), secret)


def good(**extra: object) -> dict:
    return {"userId": "u1", "iat": int(NOW) - 10, "exp": int(NOW) + 3600, **extra}


def outcome(verify: object, token: object, secret: str, config: tuple) -> tuple:
    issuer, audience, leeway = config
    try:
        with frozen():
            user, claims = verify(token, secret, issuer=issuer, audience=audience, leeway=leeway)  # type: ignore[operator]
    except AuthError as exc:
        return ("refused", exc.cause, exc.reason)
    except Exception as exc:
        return ("error", type(exc).__name__)
    return ("ok", user, repr(claims))  # repr: int and float, or key order, must not differ either


def same(token: object, secret: str = SECRET, config: tuple = CONFIGS[0]) -> tuple:
    """Both verdicts, asserted equal; returns PyJWT's."""
    reference = outcome(auth.verify_token_pyjwt, token, secret, config)
    assert outcome(auth.verify_token, token, secret, config) == reference, (token, secret, config)
    return reference


def decided_fast(token: str, secret: str = SECRET, config: tuple = CONFIGS[0]) -> bool:
    """True when the fast path gave the verdict itself (claims or a refusal) instead of falling back."""
    try:
        with frozen():
            return auth.fast_claims(token, secret, *config) is not None
    except AuthError:
        return True


def test_the_frozen_clocks_agree() -> None:
    with frozen():
        assert jwt.api_jwt.datetime.now(tz=UTC).timestamp() == auth._clock() == NOW


def curated() -> list[tuple[str, str, tuple, bool]]:
    """(token, secret, config, must the fast path decide it)."""
    cases: list[tuple[str, str, tuple, bool]] = []
    iss_aud = CONFIGS[1]
    for config in CONFIGS:
        leeway = config[2]
        full = {"iss": "fonana.me", "aud": "fonana-websocket"}
        for header in HEADERS[:3]:
            cases.append((claims_token(good(**full), header), SECRET, config, True))
        cases.append((jwt.encode(good(**full), SECRET, "HS256"), SECRET, config, True))
        # Leeway edges: PyJWT takes int(claim) and compares with now -/+ leeway.
        for delta in (-2, -1, -0.6, -0.5, -0.4, 0, 0.4, 0.5, 0.6, 1, 2):
            edge = NOW - leeway + delta
            for value in (int(edge), edge):
                cases.append((claims_token({**good(**full), "exp": value}), SECRET, config, True))
            future = NOW + leeway + delta
            for value in (int(future), future):
                cases.append((claims_token({**good(**full), "nbf": value}), SECRET, config, True))
                cases.append((claims_token({**good(**full), "iat": value}), SECRET, config, True))
    fast = [
        good(exp=int(NOW) - 3600),
        {"userId": "u1"},
        good(exp=None),
        {"sub": "u2", "exp": int(NOW) + 60},
        good(sub=42),
        good(jti=7),
        good(jti="j"),
        good(userId=123),
        good(userId=0, sub="s"),
        good(userId=True),
        good(userId=""),
        good(userId=["a"]),
        good(userId={"a": 1}),
        {"exp": int(NOW) + 60},
        good(exp=1e300),
        good(exp=-5),
        good(userId="x" * 200_000),  # a huge token
        good(nested={"a": [1, 2.5, None, True, "é", "\u2028"]}),
    ]
    for claims in fast:
        for config in CONFIGS[:3]:
            cases.append((claims_token(claims), SECRET, config, True))
    for claims in (good(), good(iss="other", aud="fonana-websocket"), good(iss="fonana.me", aud="x")):
        cases.append((claims_token(claims), SECRET, iss_aud, True))
    for claims in (good(iss=5, aud="fonana-websocket"), good(iss="fonana.me", aud=""), good(aud="x")):
        cases.append((claims_token(claims), SECRET, iss_aud, True))
    unusual = [
        good(exp="1900000000"),
        good(exp=True),
        good(nbf="soon"),
        good(iat=[1]),
        good(exp=10**30),
        good(userId=10**25),
        good(iss="fonana.me", aud=["fonana-websocket", "other"]),
        good(iss="fonana.me", aud=["other"]),
        good(iss="fonana.me", aud=[1]),
        good(iss="fonana.me", aud={"a": 1}),
    ]
    for claims in unusual:
        cases.append((claims_token(claims), SECRET, iss_aud, False))
    return cases


def tampered() -> list[str]:
    """Tokens that are wrong in every way a client or an attacker might send."""
    token = claims_token(good())
    header, payload, sig = token.split(".")
    other = claims_token(good(userId="admin")).split(".")[1]
    flipped = sig[:5] + ("A" if sig[5] != "A" else "B") + sig[6:]
    spare_bits = sig[:-1] + chr(ord(sig[-1]) + 1)  # same bytes in lenient decoders, non-canonical
    return [
        claims_token(good(), secret="another-secret-" + "z" * 32),
        f"{header}.{other}.{sig}",
        f"{b64(HEADERS[1])}.{payload}.{sig}",
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.{spare_bits}",
        f"{header}.{payload}.{sig}=",
        f"{header}.{payload}.{sig[:-1]}",
        f"{header}.{payload}.{sig}A",
        f"{header}.{payload}.",
        f"{header}.{payload}=.{sig}",
        f"{header}==.{payload}.{sig}",
        f"{header}.{payload}.{sig}.",
        f"{header}.{payload}",
        f" {token}",
        f"{token} ",
        f"{header}.{payload[:10]} {payload[10:]}.{sig}",
        f"{header}.{payload[:10]}+{payload[11:]}.{sig}",
        token.replace(".", "..", 1),
        jwt.encode(good(), SECRET, "HS512"),
        jwt.encode(good(), SECRET, "HS384"),
        jwt.encode(good(), SECRET, "HS256", headers={"kid": "k1"}),
        f"{b64(HEADERS[9])}.{payload}.",
        f"{b64(HEADERS[9])}.{payload}.{sig}",
        signed(HEADERS[10], json.dumps(good()).encode(), digest="sha512"),
        "not.a.jwt",
        "garbage",
        "...",
        "a.b.c",
        "eyJ.eyJ.eyJ",
        "é.é.é",
        "\ud800.x.y",
        "\x00" * 50,
    ]


def odd_payloads() -> list[bytes]:
    """Payload bytes where json (PyJWT) and orjson may read differently."""
    exp = int(NOW) + 60
    return [
        b'{"userId":"u","exp":%d,"exp":1}' % exp,
        b'{"exp":1,"userId":"u","exp":%d}' % exp,
        b'{"userId":"u","exp":%d,"n":NaN}' % exp,
        b'{"userId":"u","exp":%d,"n":1e400}' % exp,
        b'{"userId":18446744073709551616,"exp":%d}' % exp,
        b'{"userId":-9223372036854775809,"exp":%d}' % exp,
        b'{"userId":9223372036854775807,"exp":%d}' % exp,
        b'{"userId":"u","exp":%d,"l":[18446744073709551616]}' % exp,
        b'{"userId":"u","exp":%d,"d":{"n":-9223372036854775809}}' % exp,
        b'{"userId":"u","exp":%d.999999999999}' % exp,
        b'{"userId":"u","exp":%de0}' % exp,
        b'{"userId":"\\ud800","exp":%d}' % exp,
        b'{"userId":"\xed\xa0\x80","exp":%d}' % exp,
        b'\xef\xbb\xbf{"userId":"u","exp":%d}' % exp,
        json.dumps({"userId": "u", "exp": exp}).encode("utf-16"),
        b' \t\r\n{"userId":"u","exp":%d} \n' % exp,
        b'{"userId":"u","exp":%d}x' % exp,
        b'{"userId":"u\x01","exp":%d}' % exp,
        b'{"userId":"u","exp":%d,"d":%s}' % (exp, b"[" * 2000 + b"]" * 2000),
        b"[1,2]",
        b'"u"',
        b"null",
        b"",
        b"\xff",
    ]


def test_curated_tokens_give_the_same_verdict_and_common_ones_stay_on_the_fast_path() -> None:
    for token, secret, config, must_be_fast in curated():
        same(token, secret, config)
        if must_be_fast:
            assert decided_fast(token, secret, config), (token, config)


def test_tampered_and_garbage_tokens_give_the_same_verdict() -> None:
    verdicts = {same(token, SECRET, config) for token in tampered() for config in CONFIGS}
    assert ("refused", "bad_signature", "Unauthorized: invalid token signature") in verdicts
    assert ("refused", "malformed", "Unauthorized: malformed token") in verdicts


def test_wrong_secret_and_flipped_signatures_are_refused_on_the_fast_path() -> None:
    token = claims_token(good())
    header, payload, sig = token.split(".")
    for forged in (
        claims_token(good(), secret="another-secret-" + "z" * 32),
        f"{header}.{payload}.{'A' * 43}",
    ):
        assert same(forged)[1] == "bad_signature"
        assert decided_fast(forged)


def test_alg_none_and_other_algorithms_never_pass_the_fast_path() -> None:
    payload = b64(json.dumps(good()).encode())
    for header in HEADERS[5:]:
        for token in (f"{b64(header)}.{payload}.", signed(header, json.dumps(good()).encode())):
            assert not decided_fast(token), header
            assert same(token)[0] != "ok" or header.startswith(b'{"alg":"HS256"')


def test_odd_payloads_give_the_same_verdict() -> None:
    for payload in odd_payloads():
        for header in HEADERS[:4]:
            for config in CONFIGS[:2]:
                same(signed(header, payload), SECRET, config)


def test_secrets_pyjwt_refuses_or_warns_about_give_the_same_outcome() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
    for secret in ("short-secret-123", pem, '{"kty":"oct","k":"abc"}', "sécret-" + "é" * 20):
        token = claims_token(good(), secret=secret)
        same(token, secret)
        same(claims_token(good()), secret)


def test_no_token_is_refused_alike() -> None:
    for token in (None, ""):
        assert same(token) == (
            "refused",
            "no_token",
            "Unauthorized: no token (send ?token=JWT or Authorization: Bearer JWT)",
        )


# -- hypothesis: mutations of real tokens, random claims, random payload bytes

TOKEN = claims_token(good(iss="fonana.me", aud="fonana-websocket", sub="u1"))
MUTATION_CHARS = "AQgwBb09-_+/=. \n%é"


@st.composite
def mutated(draw: st.DrawFn) -> str:
    token = draw(st.sampled_from([TOKEN, claims_token(good()), jwt.encode(good(), SECRET, "HS256")]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(token)))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.sampled_from(MUTATION_CHARS))
        if kind == "insert":
            token = token[:at] + char + token[at:]
        elif kind == "delete":
            token = token[:at] + token[at + 1 :]
        else:
            token = token[:at] + char + token[at + 1 :]
    return token


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz(400)
@given(mutated(), st.sampled_from(CONFIGS))
def test_mutated_tokens_give_the_same_verdict(token: str, config: tuple) -> None:
    same(token, SECRET, config)


def near(center: float) -> st.SearchStrategy:
    return st.one_of(
        st.integers(int(center) - 400, int(center) + 400),
        st.floats(center - 400, center + 400),
    )


CLAIM_VALUES = st.one_of(
    near(NOW),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["fonana.me", "fonana-websocket", "u1", "", "1900000000"]),
    st.booleans(),
    st.none(),
    st.lists(st.sampled_from(["fonana-websocket", "other", 1]), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
CLAIM_NAMES = st.sampled_from(["userId", "sub", "exp", "nbf", "iat", "iss", "aud", "jti", "x"])


@fuzz(600)
@given(
    st.dictionaries(CLAIM_NAMES, CLAIM_VALUES, max_size=8),
    st.sampled_from(HEADERS[:4]),
    st.sampled_from(CONFIGS),
)
def test_random_claims_give_the_same_verdict(claims: dict, header: bytes, config: tuple) -> None:
    same(signed(header, json.dumps(claims).encode()), SECRET, config)


JSON_BITS = st.sampled_from(
    ['{"userId":"u","exp":1800000100', ",", '"a":', "1", "-0", "1e5", "1.5", "9" * 19, "1" * 25, "1e400",
     "NaN", '"\\ud800"', '"\\u00e9"', "é", " ", "\n", "[", "]", "{", "}", "null", "true", '"exp":', '"x"']
)  # fmt: skip


@fuzz(400)
@given(st.lists(JSON_BITS, max_size=12).map("".join), st.sampled_from(["}", ""]))
def test_random_payload_bytes_give_the_same_verdict(body: str, end: str) -> None:
    same(signed(HEADERS[0], (body + end).encode("utf-8", "surrogatepass")), SECRET, CONFIGS[0])


def test_the_fast_path_decides_most_random_valid_tokens() -> None:
    """Guards the differential tests above against a fast path that always falls back."""
    tokens = [claims_token(good(n=i, sub=f"s{i}")) for i in range(50)]
    assert all(decided_fast(token) for token in tokens)
    assert all(same(token)[0] == "ok" for token in tokens)
