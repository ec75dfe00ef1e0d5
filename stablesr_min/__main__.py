import os

# Intel MKL's matrix products may round differently depending on where in memory their operands happen to
# sit, so a training run resumed in a new process can drift from one that never stopped (seen with one
# thread per process, torchrun's default). Its strict mode makes them bit-reproducible for a given thread
# count, for about the same speed; set MKL_CBWR yourself to choose otherwise. MKL reads it on first use, so
# it is set here, before anything imports torch (a program that trains from Python sets it likewise).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .app.signals import run_command_line  # noqa: E402 (imports nothing heavy)


def command_line() -> int:
    from .app.cli import main  # imports torch: seconds, during which Ctrl-C and SIGTERM end as they do later

    return main()


run_command_line(command_line)
