"""Shipped in a submitted job's working dir (Ray puts it first on every job process's PYTHONPATH, so Python
imports it at start-up): the task named in SHPEFT_TEST_HOLD=<task>:<marker file> waits after its first
checkpoint, once, so the test can take its node away while it still has epochs to run, however loaded
the machine. The marker file records which process waits (its PID; the test finds the node from it) and
is written before the wait; the attempt that resumes on another node finds it and runs straight through.
"""

import os

_spec = os.environ.get("SHPEFT_TEST_HOLD")
if _spec:
    import json
    import time

    import shpeft_core.train as _train

    _task, _marker = _spec.split(":", 1)
    _save = _train.save_train_state

    def _save_then_hold(state, dir_or_uri):
        out = _save(state, dir_or_uri)
        if f"-{_task}-" in str(dir_or_uri) and not os.path.exists(_marker):
            with open(_marker + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "checkpoint": str(dir_or_uri)}, f)
            os.replace(_marker + ".tmp", _marker)
            time.sleep(300)  # the node is killed long before this ends
        return out

    _train.save_train_state = _save_then_hold
