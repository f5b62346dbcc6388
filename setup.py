"""The one thing pyproject.toml cannot say for every setuptools: the optional C extension.

``fonana_ws.fanout._sink`` writes a loop turn's frames with one C loop (see src/fonana_ws/fanout/sink.py).
``optional=True``: without a compiler or Python's headers the install still succeeds and the server uses
the Python sink, which behaves the same, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fonana_ws.fanout._sink",
            sources=["src/fonana_ws/fanout/_sink.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
