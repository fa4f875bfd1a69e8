"""Step time and peak memory, measured the same way for every variant."""
import ctypes
import statistics
import time
from typing import Callable, Dict

import torch


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing every large
    block back to the kernel, as a GPU's caching allocator does: CPU steps then
    time the computation, not the kernel zeroing fresh pages (which costs more
    than the arithmetic in a virtual machine)."""
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def reset_peak(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    # Hand the kept memory back, then restart the high-water mark from here.
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def peak_mb(device: str) -> float:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


CLOCKS = dict(wall=time.perf_counter, cpu=time.process_time)


def interleaved_steps(steps: Dict[str, Callable[[], None]], timed: Dict[str, int],
                      warmup: int, device: str, clock: str = 'wall') -> Dict[str, dict]:
    """Median step time and peak memory of each step function.

    ``warmup`` steps of the first function create the optimizer's state (the
    functions share the optimizer), so that it is in every peak measured by
    the next round; then the functions take turns, one step each per round,
    so that warm-up effects and the drifts of a shared machine fall on all of
    them alike: a round measuring each step's peak memory, then timed rounds.

    Args:
        steps: name -> one optimizer step.
        timed: name -> how many of its steps are timed.
        warmup: steps of the first function before measuring, at least 1.
        clock: ``'wall'`` (elapsed time) or ``'cpu'`` (the process's CPU
            time: on a CPU shared with other jobs, what the step computed
            rather than how long it waited for a core; with one thread the
            two agree on an idle machine).
    """
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    now = CLOCKS[clock]
    for _ in range(max(warmup, 1)):
        next(iter(steps.values()))()
    times = {name: [] for name in steps}
    peaks = {}
    for round_index in range(1 + max(timed.values())):
        for name, step in steps.items():
            if round_index > timed[name]:
                continue
            if round_index == 0:
                reset_peak(device)
            start = now()
            step()
            sync()
            if round_index == 0:
                peaks[name] = peak_mb(device)
            else:
                times[name].append(now() - start)
    return {name: dict(median_step_s=statistics.median(times[name]), peak_mem_mb=peaks[name])
            for name in steps}
