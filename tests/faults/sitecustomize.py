"""Fault injection for the kill -9 test: loaded by the ComfyUI server process through PYTHONPATH.

CIDM_PAUSE_AT_REPLACE="<before|after>:<file name>:<n>:<flag file>" makes the n-th `os.replace` onto a file of that
name pause (forever) just before or just after it runs, once it has created the flag file. The test then kills the
server with SIGKILL, so the kill lands mid-save every time instead of by chance.
"""

import os
import time

_SPEC = os.environ.get("CIDM_PAUSE_AT_REPLACE")

if _SPEC:
    _WHEN, _NAME, _NTH, _FLAG = _SPEC.split(":", 3)
    _real_replace = os.replace
    _seen = []

    def _pause() -> None:
        with open(_FLAG, "w"):
            pass
        while True:
            time.sleep(60)

    def _replace(source, destination, **kwargs):
        hit = os.path.basename(destination) == _NAME
        if hit:
            _seen.append(destination)
            hit = len(_seen) == int(_NTH)
        if hit and _WHEN == "before":
            _pause()
        _real_replace(source, destination, **kwargs)
        if hit and _WHEN == "after":
            _pause()

    os.replace = _replace
