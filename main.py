"""Entry point: `python main.py fit|validate|test|predict --config configs/...yaml`."""

from lightning_moe.cli import end_process_group, main

if __name__ == "__main__":
    main()
    end_process_group()  # under torchrun: leave the process group before the interpreter exits
