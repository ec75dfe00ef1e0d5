import os
import signal
import sys

from .errors import Terminated, raise_terminated

# Intel MKL's matrix products may round differently depending on where in memory their operands happen to
# sit, so a training run resumed in a new process can drift from one that never stopped (seen with one
# thread per process, torchrun's default). Its strict mode makes them bit-reproducible for a given thread
# count, for about the same speed; set MKL_CBWR yourself to choose otherwise. MKL reads it on first use, so
# it is set here, before anything imports torch (a program that trains from Python sets it likewise).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


# Importing torch takes seconds, during which Ctrl-C and SIGTERM must end as they do later (the command line
# catches them from then on; these lines, until it does and after)
signal.signal(signal.SIGTERM, raise_terminated)
try:
    from .app.cli import main

    code = main()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
except Terminated:
    print("terminated", file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)
# The command has ended and said so: a stop that arrives while Python shuts down changes nothing
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(code)
