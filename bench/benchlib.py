"""Shared helpers for walship's benchmark scripts (python3 standard library only).

Clock: every timestamp is time.monotonic_ns() (CLOCK_MONOTONIC, system-wide on Linux), so times
taken in different processes compare directly.
"""
import ctypes, ctypes.util, os, re, struct, time

SEG_RE = re.compile(r'^seg-(\d+)-([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{12})-([0-9a-f]{12})\.wseg$')
SNAP_RE = re.compile(r'^snap-([0-9a-f]{16})-([0-9a-f]{12})\.wsnap$')


def pct(xs, p):
    """Nearest-rank percentile of a non-empty list (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return float('nan')
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


class Inotify:
    """Minimal inotify through ctypes (inotify_simple is not installed)."""
    IN_CREATE, IN_MOVED_TO, IN_ISDIR, IN_CLOSE_WRITE = 0x100, 0x80, 0x40000000, 0x8

    def __init__(self):
        self.libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
        self.fd = self.libc.inotify_init1(0)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), 'inotify_init1')
        self.wds = {}

    def watch(self, path, mask):
        wd = self.libc.inotify_add_watch(self.fd, path.encode(), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), 'inotify_add_watch %s' % path)
        self.wds[wd] = path
        return wd

    def read(self):
        """Blocks; returns [(dirpath, mask, name)] and the monotonic time the read returned."""
        buf = os.read(self.fd, 65536)
        t = time.monotonic_ns()
        out, i = [], 0
        while i < len(buf):
            wd, mask, _cookie, ln = struct.unpack_from('iIII', buf, i)
            name = buf[i + 16:i + 16 + ln].rstrip(b'\0').decode()
            out.append((self.wds.get(wd), mask, name))
            i += 16 + ln
        return out, t


def proc_cpu_seconds(pid):
    """utime + stime of a process (all threads), in seconds."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def proc_status(pid):
    d = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            k, _, v = line.partition(':')
            d[k] = v.strip()
    return d


def kib(v):
    return int(v.split()[0])


def ctxt_switches(pid):
    """{tid: (comm, voluntary, nonvoluntary)} over all threads of pid."""
    out = {}
    for tid in os.listdir('/proc/%d/task' % pid):
        try:
            st = proc_status_path('/proc/%d/task/%s/status' % (pid, tid))
            out[tid] = (st['Name'], int(st['voluntary_ctxt_switches']),
                        int(st['nonvoluntary_ctxt_switches']))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def proc_status_path(p):
    d = {}
    with open(p) as f:
        for line in f:
            k, _, v = line.partition(':')
            d[k] = v.strip()
    return d


def dir_bytes(root):
    total = 0
    for dp, _dn, fn in os.walk(root):
        for n in fn:
            try:
                total += os.lstat(os.path.join(dp, n)).st_size
            except FileNotFoundError:
                pass
    return total
