import sys

try:
    from .app.cli import main  # imports torch: seconds, during which Ctrl-C must end as it does later
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
