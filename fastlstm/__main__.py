"""``python -m fastlstm``: the same command line as the ``fastlstm`` script."""

from fastlstm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
