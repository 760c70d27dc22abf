"""Load generation: wrk with a Lua script that POSTs one JPEG as the raw body."""

from .wrk import WrkResult, run_wrk

__all__ = ["WrkResult", "run_wrk"]
