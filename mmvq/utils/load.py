"""How busy the machine was while a phase was timed.

A time ratio (quantized vs FP evaluation) taken while other processes used
the CPUs says more about them than about the model: on a 2-core machine a
second busy process makes every multi-threaded op wait for a time slice.
:class:`MachineLoad` records, for the phase it wraps, the wall time, the CPU
time of this process and its children (data-loader workers), and — on Linux
— the CPU time every *other* process used (``/proc/stat`` busy time minus
ours), so a report can say "other processes used 0.9 of 2 CPUs" and the
reader can discard the ratio. Elsewhere only the load average is recorded.
"""
import os
import resource
import time

BUSY_FRACTION = 0.15      # other processes above 15 % of the CPUs: timing unreliable


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _system_busy_s():
    """CPU seconds all processes spent busy since boot (None off Linux)."""
    try:
        with open('/proc/stat') as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != 'cpu':
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)          # idle + iowait
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0               # already in user/nice
    return (sum(ticks) - idle - guest) / os.sysconf('SC_CLK_TCK')


def _descendants_cpu_s():
    """CPU seconds of the live descendants of this process, by pid."""
    me = os.getpid()
    parents, cpu = {}, {}
    try:
        pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]
    except OSError:
        return {}
    tck = os.sysconf('SC_CLK_TCK')
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                rest = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[pid] = int(rest[1])
        cpu[pid] = (int(rest[11]) + int(rest[12])) / tck            # utime + stime
    out = {}
    for pid in pids:
        p, hops = parents.get(pid), 0
        while p not in (None, 0, 1, me) and hops < 64:
            p, hops = parents.get(p), hops + 1
        if p == me and pid != me:
            out[pid] = cpu[pid]
    return out


def _own_cpu_s():
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, reaped.ru_utime + reaped.ru_stime


class MachineLoad:
    """Context manager: how much CPU this process and all others used inside it.

    After exit :meth:`as_dict` gives ``wall_s``, ``cpus`` (usable by this
    process), ``process_cpu_s`` (this process, its reaped and live children),
    ``other_cpu_s`` and ``other_cpus`` (CPU seconds of every other process, and
    that per wall second; None off Linux), ``loadavg_1m`` at entry and exit,
    and ``busy`` (other processes used more than ``BUSY_FRACTION`` of the CPUs).
    """

    def __enter__(self):
        self._sys0 = _system_busy_s()
        self._self0, self._reaped0 = _own_cpu_s()
        self._kids0 = _descendants_cpu_s()
        self._load0 = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._t0
        sys1 = _system_busy_s()
        self1, reaped1 = _own_cpu_s()
        kids1 = _descendants_cpu_s()
        kids = sum(v - self._kids0.get(pid, 0.0) for pid, v in kids1.items())
        self.process_cpu_s = (self1 - self._self0) + (reaped1 - self._reaped0) + max(0.0, kids)
        self.cpus = _cpu_count()
        self.other_cpu_s = None
        if self._sys0 is not None and sys1 is not None:
            self.other_cpu_s = max(0.0, (sys1 - self._sys0) - self.process_cpu_s)
        self.loadavg_1m = (self._load0, os.getloadavg()[0] if hasattr(os, 'getloadavg') else None)
        return False

    @property
    def other_cpus(self):
        """Average number of CPUs other processes kept busy (None if unknown)."""
        if self.other_cpu_s is None or self.wall_s <= 0:
            return None
        return self.other_cpu_s / self.wall_s

    @property
    def busy(self):
        other = self.other_cpus
        if other is None:          # no /proc/stat: fall back to the load average
            load = self.loadavg_1m[1]
            return None if load is None else load > self.cpus * (1 + BUSY_FRACTION)
        return other > BUSY_FRACTION * self.cpus

    def as_dict(self):
        other = self.other_cpus
        return dict(wall_s=round(self.wall_s, 4), cpus=self.cpus,
                    process_cpu_s=round(self.process_cpu_s, 3),
                    other_cpu_s=None if self.other_cpu_s is None else round(self.other_cpu_s, 3),
                    other_cpus=None if other is None else round(other, 3),
                    loadavg_1m=list(self.loadavg_1m), busy=self.busy,
                    busy_threshold=f'other processes > {BUSY_FRACTION:.0%} of {self.cpus} CPUs')

    def describe(self):
        """One phrase for a console warning."""
        other = self.other_cpus
        if other is None:
            return f'load average {self.loadavg_1m[1]:.2f} on {self.cpus} CPUs'
        return f'other processes kept {other:.2f} of {self.cpus} CPUs busy'
