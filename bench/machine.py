"""What every bench shares: the machine's state, printed first (ratios on a shared machine move with its load), and
timings run in turns with per-round (paired) ratios, so a burst of load hits both sides of a ratio alike."""

import os
import statistics
import time

import torch


def machine_line():
    from klein_nodes.models import prepacked

    return (f"machine: load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, {prepacked.describe()}"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def interleaved(fns, repeats, warmup=1):
    """Seconds of each function in each of `repeats` rounds (after `warmup` uncounted ones), run in turns; every
    other round in reverse order, so no function always runs right after the same one."""
    samples = [[] for _ in fns]
    for round_ in range(warmup + repeats):
        turns = list(zip(fns, samples))
        for fn, times in turns if round_ % 2 == 0 else turns[::-1]:
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_ >= warmup:
                times.append(time.perf_counter() - start)
    return samples


def median_time(fn, repeats):
    """Median seconds of `fn` over `repeats` runs after one warm-up."""
    return statistics.median(interleaved([fn], repeats)[0])


def paired(times, reference):
    """The per-round ratios times / reference as (min, median, max)."""
    ratios = sorted(t / r for t, r in zip(times, reference))
    return ratios[0], statistics.median(ratios), ratios[-1]


def paired_text(times, reference, digits=2):
    low, mid, high = paired(times, reference)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
