"""The machine's state, printed first by every bench: ratios on a shared machine move with its load."""

import os

import torch


def machine_line():
    return (f"machine: load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads" + (f", {torch.cuda.get_device_name()}"
                                                          if torch.cuda.is_available() else ""))
