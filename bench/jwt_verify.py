"""What verifying a connect's JWT costs: PyJWT alone against the HS256 fast path of ``verify_token``.

    .venv/bin/python bench/jwt_verify.py [--tokens 100000] [--rounds 3]

Makes ``--tokens`` distinct tokens (as in a cold-connect storm: every client its own token, so no cache
can help), then verifies all of them with ``verify_token_pyjwt`` and with ``verify_token``, in
alternating rounds, and prints the CPU time per verify (best and median round). Valid tokens are what a
storm mostly is; forged ones (wrong secret) and expired ones are what an attacker or a stale client
sends. No sockets, no processes; the run stops by itself after ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import jwt

from fonana_ws.auth import AuthError, verify_token, verify_token_pyjwt

SECRET = "bench-jwt-secret-" + "s" * 32
ISSUER = "fonana.me"
AUDIENCE = "fonana-websocket"


def make_tokens(n: int, *, secret: str = SECRET, exp_offset: int = 3600) -> list[str]:
    """``n`` distinct tokens shaped like the web app's (userId, iat, exp, iss, aud)."""
    now = int(time.time())
    claims = {"iat": now, "exp": now + exp_offset, "iss": ISSUER, "aud": AUDIENCE}
    return [jwt.encode({"userId": f"user-{i}", **claims}, secret, "HS256") for i in range(n)]


def cpu_us_per_verify(verify: Callable[..., tuple[str, dict]], tokens: list[str]) -> float:
    """CPU µs per call of ``verify`` over ``tokens`` (refusals included: they are verdicts too)."""
    start = time.process_time_ns()
    for token in tokens:
        try:
            verify(token, SECRET, issuer=ISSUER, audience=AUDIENCE, leeway=30.0)
        except AuthError:
            pass
    return (time.process_time_ns() - start) / len(tokens) / 1000


def verdicts(verify: Callable[..., tuple[str, dict]], tokens: list[str]) -> list[object]:
    out: list[object] = []
    for token in tokens:
        try:
            out.append(verify(token, SECRET, issuer=ISSUER, audience=AUDIENCE, leeway=30.0))
        except AuthError as exc:
            out.append((exc.cause, exc.reason))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="distinct valid tokens (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per verifier (default 3)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
    sets = {
        "valid": make_tokens(args.tokens),
        "forged": make_tokens(max(args.tokens // 10, 1), secret="another-secret-" + "z" * 32),
        "expired": make_tokens(max(args.tokens // 10, 1), exp_offset=-3600),
    }
    for name, tokens in sets.items():  # the numbers mean nothing if the verdicts differ
        sample = tokens[:1000]
        assert verdicts(verify_token, sample) == verdicts(verify_token_pyjwt, sample), name
    print(
        f"{'tokens':<8} {'count':>7} {'PyJWT µs best/median':>22} {'fast µs best/median':>21} {'speed-up':>9}"
    )
    for name, tokens in sets.items():
        times: dict[str, list[float]] = {"pyjwt": [], "fast": []}
        for _ in range(args.rounds):
            times["pyjwt"].append(cpu_us_per_verify(verify_token_pyjwt, tokens))
            times["fast"].append(cpu_us_per_verify(verify_token, tokens))
        slow, fast = times["pyjwt"], times["fast"]
        print(
            f"{name:<8} {len(tokens):>7} {min(slow):>10.2f} / {statistics.median(slow):<9.2f}"
            f" {min(fast):>9.2f} / {statistics.median(fast):<9.2f} {min(slow) / min(fast):>8.1f}x"
        )


if __name__ == "__main__":
    main()
