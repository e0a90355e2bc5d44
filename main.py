"""Entry point: `python main.py fit|validate|test|predict --config configs/...yaml`."""

from lightning_moe.cli import leave_process_group_and_exit, main

if __name__ == "__main__":
    main()
    leave_process_group_and_exit()  # under torchrun: no rank may abort in the interpreter's finalisation
