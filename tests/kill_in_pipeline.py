"""``python kill_in_pipeline.py WHEN ARGS...``: the medalloy CLI with ARGS, killed by SIGKILL at
WHEN: ``METHOD:STEP`` right after training step STEP of a run of METHOD (``distill:3``), or
``after:STAGE`` right after ``pipeline.json`` first records STAGE as done (between two stages).

A real kill: no exception unwinds, no ``finally`` runs, files stay as they are at that instant.
"""

import os
import signal
import sys

from medalloy.engine import trainer
from medalloy.pipeline import runner

WHEN = sys.argv[1]
_kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731

if WHEN.startswith("after:"):
    STAGE = WHEN.split(":", 1)[1]
    _write = runner.write_json_atomic

    def _write_then_kill(path, obj, *args, **kwargs):
        _write(path, obj, *args, **kwargs)
        if path.name == runner.STATE_FILE and obj["stages"].get(STAGE, {}).get("status") == "done":
            _kill()

    runner.write_json_atomic = _write_then_kill
else:
    METHOD, STEP = WHEN.split(":")
    _init = trainer.Trainer.__init__

    def _init_with_kill(self, spec, *args, **kwargs):
        _init(self, spec, *args, **kwargs)
        if spec.record.get("method") == METHOD:
            spec.on_step_end.append(lambda step, _scalars: _kill() if step == int(STEP) else None)

    trainer.Trainer.__init__ = _init_with_kill

from medalloy.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
