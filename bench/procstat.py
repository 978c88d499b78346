"""Reads the CPU time and resident memory of a whole process tree from /proc."""
import os
import threading

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid):
    """Returns the fields of /proc/<pid>/stat after the command name (field 3 first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            data = handle.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def tree_pids(root):
    """Returns root and every live descendant of it."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(name)
        if fields is None or fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids):
    """Returns user plus system CPU seconds of pids, including their reaped children."""
    ticks = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def rss_bytes(pids):
    """Returns the summed resident memory of pids."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[21]) * PAGE_SIZE
    return total


class TreeSampler:
    """Samples a process tree's resident memory in a thread and keeps the peak."""

    def __init__(self, root, interval=0.05, rescan_every=10):
        self.root = root
        self.interval = interval
        self.rescan_every = rescan_every
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def pids(self):
        return tree_pids(self.root)

    def __enter__(self):
        self.start_pids = self.pids()
        self.start_cpu = cpu_seconds(self.start_pids)
        self.start_rss = rss_bytes(self.start_pids)
        self.peak_rss = self.start_rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        pids = self.pids()
        self.cpu = cpu_seconds(pids) - self.start_cpu
        self.peak_rss = max(self.peak_rss, rss_bytes(pids))

    def _run(self):
        pids = self.start_pids
        rounds = 0
        while not self._stop.wait(self.interval):
            rounds += 1
            if rounds % self.rescan_every == 0:
                pids = self.pids()
            self.peak_rss = max(self.peak_rss, rss_bytes(pids))
