"""`python -m lightning_moe.inference {export,profile,plan,generate} ...` (see cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
