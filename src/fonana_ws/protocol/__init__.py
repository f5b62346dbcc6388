"""The wire protocol, pure: frames in and out, channel keys, the broker envelope, one socket's session.

Nothing here does I/O or imports asyncio, a web server or a database: every rule can be tested with a
plain function call (``tests/unit``).
"""
