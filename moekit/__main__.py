"""`python -m moekit ...` (and `torchrun ... -m moekit ...`): the moekit command line."""

from moekit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
