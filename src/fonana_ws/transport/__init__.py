"""Bytes on the socket: the only code that imports uvicorn's protocol classes or websockets.

``wire`` is the direct write path (an outlet the connection writes ready frames to), ``http_edge`` the
HTTP/1.1 protocol that bounds headers, bodies and idle sockets in time and size.
"""
