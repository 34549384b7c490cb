import os
import sys

from .cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ:
    # One of several launched processes: leave without the interpreter's teardown. Gloo's worker threads may still
    # hold finished work whose tensors need the interpreter when they are freed during finalisation, which aborts
    # the process (SIGABRT, "terminate called without an active exception") after a run that completed: seen twice
    # in CI, in the two-process tests. Everything the run wrote is already flushed and renamed into place by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
