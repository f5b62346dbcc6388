"""The Starlette app: the WebSocket endpoint (driver of the protocol session), HTTP routes, metrics."""
