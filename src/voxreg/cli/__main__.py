"""``python -m voxreg.cli`` (used by torchrun)."""

from voxreg.cli.app import main

if __name__ == "__main__":  # pragma: no cover
    main()
