"""How many torch intra-op threads a run uses: a number the user fixed, or ``auto``, the cores that other
programs leave idle, looked at again every half second of training.

Why not torch's default of one thread per core: torch's threads wait for each other at the end of every
parallel region, so one that shares its core with another busy program holds up all of them. On a 2-core
machine two MAPPO runs with 2 threads each ran 11x slower than one alone; with 1 thread each, about as
fast as alone (``benchmarks/busy_machine.py``). ``auto`` gives an idle machine all its cores and drops a
thread per core another program keeps busy, within about half a second; a run that evaluates in a worker
process (``logger.eval_parallel``) leaves it a core while it evaluates (:meth:`ThreadGovernor.reserve`). A
run restores torch's count when it ends, so a notebook keeps its own setting.

The choice, first that is set: ``marlkit train --threads`` (``auto`` or a number), ``$MARLKIT_THREADS``,
``$OMP_NUM_THREADS`` (a number fixes the count, as it does for torch), else ``auto``; a resumed run with
none of these keeps the fixed count it ran with. The count can change results: where torch splits a sum
over threads (weight gradients of batches of about 1,024 rows or more, reductions over more than about
32,000 numbers) the numbers add in another order, and a run diverges from its 1-thread twin from that
update on (IQL's default 4,096-sample batches on the grid world do; pursuit-super's 32-sample batches
did not). Fix the count where bit-exact reproduction matters: ``auto`` follows the machine's load.
"""

from __future__ import annotations

import os
import time

import torch

ENV_VAR = "MARLKIT_THREADS"
WINDOW_S = 0.5
"""How often ``auto`` looks at the load (at the next :func:`poll` after this long), and the span it averages
over, so one busy moment does not flip the count while a new competitor costs at most about this long."""
_active: ThreadGovernor | None = None
"""The running ``auto`` governor: torch has one intra-op pool per process, so there is one at a time."""


def thread_setting(value: str | None = None) -> int | None:
    """``value`` (else ``$MARLKIT_THREADS``, else ``$OMP_NUM_THREADS``) as a fixed count, or None for auto;
    raises ``ValueError`` naming the bad value."""
    source = "--threads"
    if value is None:
        source, value = ENV_VAR, os.environ.get(ENV_VAR)
        if not value:  # OpenMP's own variable, as torch reads it: the outermost level of "4,2"
            first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
            return int(first) if first.isdigit() and int(first) >= 1 else None
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"{source}={value!r} is not a thread count; accepted: auto or a whole number >= 1")


def thread_setting_chosen() -> bool:
    """Whether the user chose a setting (``--threads``, which the CLI passes on as ``$MARLKIT_THREADS``, or
    either variable), as opposed to ``auto`` by default."""
    return bool(os.environ.get(ENV_VAR) or os.environ.get("OMP_NUM_THREADS", "").strip())


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


class ThreadGovernor:
    """Sets torch's intra-op thread count for a run and, in ``auto``, adapts it to the machine's load."""

    def __init__(self, fixed: int | None):
        self.fixed = fixed
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.cpus = os.cpu_count() or self.cores  # /proc/stat counts every CPU, not just ours
        self.changes = 0
        self.reserved = 0  # cores kept for the run's own worker processes while they work
        self._others: float | None = None  # cores other programs keep busy, the run's own workers aside
        self._before = torch.get_num_threads()
        if fixed is not None:
            torch.set_num_threads(fixed)
            return
        self._mark()
        time.sleep(0.1)  # a first look at the load, while this process is idle
        self._others = self._measure()
        torch.set_num_threads(self._idle_cores(self._others) or torch.get_num_threads())
        self._mark()
        global _active
        _active = self

    @property
    def policy(self) -> str:
        """``auto`` or ``fixed``."""
        return "fixed" if self.fixed is not None else "auto"

    def _mark(self) -> None:
        self._wall, self._own, self._jiffies = time.perf_counter(), time.process_time(), _cpu_jiffies()
        self._reserved_in_window = self.reserved > 0

    def _measure(self) -> float | None:
        """Cores that other programs kept busy since the last mark (None where it cannot be told)."""
        jiffies = _cpu_jiffies()
        if jiffies is None or self._jiffies is None:
            return None
        busy, total = (now - before for now, before in zip(jiffies, self._jiffies))
        wall, own = time.perf_counter() - self._wall, time.process_time() - self._own
        if total <= 0 or wall <= 0:
            return None
        return max(0.0, busy / total * self.cpus - own / wall)

    def _idle_cores(self, others: float | None) -> int | None:
        if others is None:
            return None
        return max(1, min(self.cores, self.cores - self.reserved - int(others + 0.5)))

    def reserve(self, cores: int) -> None:
        """In ``auto``, leave ``cores`` to the run's own worker processes from now on (0: they are idle).
        Their work comes in bursts (an evaluation now and then), which the load, looked at every half
        second, would follow too late: while they work, a thread on their core would stall the others
        at every parallel region; while they wait, the run gets the core back."""
        if self.fixed is not None or cores == self.reserved:
            return
        released = cores == 0
        self.reserved = cores
        if cores:
            self._reserved_in_window = True
        elif released:  # the next look at the load covers only time without the workers
            self._mark()
        self._apply()

    def _apply(self) -> None:
        wanted = self._idle_cores(self._others)
        if wanted is not None and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            self.changes += 1

    def poll(self) -> None:
        """In ``auto``, once every :data:`WINDOW_S`: set the thread count from the load other programs put
        on the machine since the last look (cheap otherwise: one clock read)."""
        if self.fixed is not None or time.perf_counter() - self._wall < WINDOW_S:
            return
        others = self._measure()
        if not self._reserved_in_window:  # a window in which the run's own workers worked overstates the others
            self._others = others
        self._apply()
        self._mark()

    def close(self) -> None:
        """The run is over: stop adapting and give torch back the count it had before the run."""
        global _active
        if _active is self:
            _active = None
        torch.set_num_threads(self._before)


def poll() -> None:
    """Let the running ``auto`` governor, if any, look at the load; called by every optimiser step
    (:func:`~marlkit.pipelines.learners.gradient_step`) and at the end of every iteration, where torch's
    threads do their work, so the loops need not know about threads."""
    if _active is not None:
        _active.poll()
