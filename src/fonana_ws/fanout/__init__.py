"""One process's delivery core: connections with bounded backlogs, and the hub that routes to them.

It knows nothing of HTTP or of the socket library: a connection writes to an outlet it is handed.
"""
