"""Entry point: `python main.py fit|validate|test|predict --config configs/...yaml`."""

from lightning_moe.cli import main

if __name__ == "__main__":
    main()
