"""``python kill_at_step.py STEP ARGS...``: the medalloy CLI with ARGS, killed by SIGKILL right
after training step STEP (also under torchrun, where every rank kills itself at that step).

A real kill: no exception unwinds, no ``finally`` runs, files stay as they are at that instant.
"""

import os
import signal
import sys

from medalloy.engine import trainer

STEP = int(sys.argv[1])
_init = trainer.Trainer.__init__


def _init_with_kill(self, spec, *args, **kwargs):
    _init(self, spec, *args, **kwargs)
    spec.on_step_end.append(lambda step, _scalars: os.kill(os.getpid(), signal.SIGKILL) if step == STEP else None)


trainer.Trainer.__init__ = _init_with_kill

from medalloy.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
