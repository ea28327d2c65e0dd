"""What each scenario's guest holds: processes, threads and the handles they have open."""
from __future__ import annotations

import random

from .handles import AUDIT, INHERIT, PROTECT_CLOSE

SESSION_BNO = "\\Sessions\\1\\BaseNamedObjects"
SYSTEM_KEYS = ["SYSTEM\\CONTROLSET001\\CONTROL\\NLS\\SORTING\\VERSIONS", "SYSTEM\\CONTROLSET001\\SERVICES",
               "SOFTWARE\\MICROSOFT\\WINDOWS NT\\CURRENTVERSION", "HARDWARE\\DESCRIPTION\\SYSTEM",
               "SYSTEM\\CONTROLSET001\\CONTROL\\SESSION MANAGER", "SOFTWARE\\POLICIES\\MICROSOFT\\WINDOWS",
               "SOFTWARE\\MICROSOFT\\OLE", "SYSTEM\\CONTROLSET001\\CONTROL\\LSA",
               "SOFTWARE\\MICROSOFT\\WINDOWS\\CURRENTVERSION\\EXPLORER\\FOLDERDESCRIPTIONS",
               "SYSTEM\\CONTROLSET001\\SERVICES\\TCPIP\\PARAMETERS", "SOFTWARE\\CLASSES"]
USER_SID = "S-1-5-21-3623811015-3361044348-30300820-1013"
USER_KEYS = ["SOFTWARE\\MICROSOFT\\WINDOWS\\CURRENTVERSION\\EXPLORER", "CONTROL PANEL\\DESKTOP",
             "SOFTWARE\\CLASSES", "SOFTWARE\\MICROSOFT\\WINDOWS\\CURRENTVERSION\\INTERNET SETTINGS"]
FILES = ["\\Windows\\System32", "\\Windows", "\\Windows\\System32\\en-US\\KernelBase.dll.mui",
         "\\Windows\\System32\\locale.nls", "\\Windows\\Fonts\\StaticCache.dat",
         "\\Windows\\WinSxS\\amd64_microsoft.windows.common-controls_6595b64144ccf1df_6.0.19041.1_none",
         "\\Windows\\System32\\en-US\\svchost.exe.mui", "\\ProgramData\\Microsoft\\Windows\\Caches\\cversions.2.db",
         "\\Windows\\Registration\\R000000000006.clb", "\\Windows\\System32\\catroot2\\edb.log"]
KERNEL_FILES = ["\\pagefile.sys", "\\Windows\\System32\\config\\SYSTEM", "\\Windows\\System32\\config\\SOFTWARE",
                "\\$Extend\\$RmMetadata\\$TxfLog\\$TxfLog.blf", "\\Windows\\System32\\config\\DEFAULT",
                "\\$Mft", "\\System Volume Information\\tracking.log", "\\Windows\\bootstat.dat"]
EVENT_NAMES = ["ShellReadyEvent", "TermSrvReadyEvent", "SC_AutoStartComplete", "WinlogonLogoff",
               "CTF.TimListCache.FMPDefaultS-1-5-18MUTEX.DefaultS-1-5-18", "LsaRpcServerReadyEvent",
               "Global\\SvcctrlStartEvent_A3752DX", "UniqueSessionIdEvent", "MSCTF.Asm.MutexDefault1"]
MUTANT_NAMES = ["SM0:788:304:WilStaging_02", "SessionImmersiveColorMutex", "ZonesCacheCounterMutex",
                "ZonesLockedCacheCounterMutex", "_SHuassist.mtx", "DBWinMutex"]
SECTION_NAMES = ["windows_shell_global_counters", "Cor_Private_IPCBlock_v4_788", "__ComCatalogCache__",
                 "CsrSbSyncEvent", "C:*ProgramData*Microsoft*Windows*Caches*cversions.2.ro"]

# (type, granted-access choices) of the common per-process handle mix.
ACCESS = {
    "Event": [0x1F0003, 0x100002, 0x100003], "Mutant": [0x1F0001, 0x100000],
    "Semaphore": [0x1F0003, 0x100003], "Section": [0x4, 0x6, 0xF001F], "File": [0x100001, 0x120089,
    0x12019F, 0x100020, 0x100080], "Key": [0x20019, 0xF003F, 0x1, 0x20006, 0x9],
    "Directory": [0x3, 0xF, 0xF000F], "ALPC Port": [0x1F0001], "IoCompletion": [0x1F0003],
    "TpWorkerFactory": [0xF00FF, 0x4], "WaitCompletionPacket": [0x1], "IRTimer": [0x100002],
    "Timer": [0x1F0003, 0x100002], "Token": [0x8, 0xA, 0xF01FF, 0x2000C], "Thread": [0x1FFFFF, 0x1400,
    0x100000, 0x1478], "Process": [0x1FFFFF, 0x1478, 0x1000, 0x101000, 0x1410],
    "EtwRegistration": [0x804], "Desktop": [0xF01FF], "WindowStation": [0xF037F],
    "SymbolicLink": [0x1, 0xF0001], "Job": [0x1F003F], "KeyedEvent": [0xF0003],
}

WIN10_PROCESSES = [("System", 4, 0), ("smss.exe", 340, 4), ("csrss.exe", 436, 428),
                   ("wininit.exe", 512, 428), ("services.exe", 652, 512), ("lsass.exe", 672, 512),
                   ("svchost.exe", 788, 652), ("svchost.exe", 840, 652), ("explorer.exe", 3512, 3480),
                   ("RuntimeBroker.exe", 3956, 788), ("WerFault.exe", 4188, 840)]
BIG_NAMES = ["svchost.exe", "RuntimeBroker.exe", "chrome.exe", "conhost.exe", "dllhost.exe",
             "SearchProtocolHost.exe", "MsMpEng.exe", "taskhostw.exe", "backgroundTaskHost.exe",
             "WmiPrvSE.exe", "spoolsv.exe", "audiodg.exe", "sihost.exe", "ctfmon.exe", "Code.exe"]


def attributes(rng: random.Random) -> int:
    r = rng.random()
    return INHERIT if r < 0.05 else PROTECT_CLOSE if r < 0.08 else AUDIT if r < 0.09 else \
        INHERIT | PROTECT_CLOSE if r < 0.1 else 0


class Population:
    """Fills a world (guest.World) with a scenario's processes and handles."""

    def __init__(self, world, rng: random.Random):
        self.w = world
        self.rng = rng
        self.types = set(world.om.types)

    def access(self, type_name: str) -> int:
        return self.rng.choice(ACCESS.get(type_name, [0x1F0001]))

    def open(self, proc, obj, access: int | None = None, attrs: int | None = None) -> int:
        return self.w.handle(proc, obj, self.access(obj.type) if access is None else access,
                             attributes(self.rng) if attrs is None else attrs)

    def mix(self, proc, n: int, session: bool = True) -> None:
        """n handles of the usual kinds a user-mode process holds."""
        cat, rng = self.w.cat, self.rng
        bno = SESSION_BNO if session else "\\BaseNamedObjects"
        self.open(proc, cat.directory("\\KnownDlls"), 0x3)
        self.open(proc, cat.directory(bno), 0xF)
        self.open(proc, cat.file(rng.choice(FILES[:2])))
        kinds = ["Event"] * 6 + ["File"] * 3 + ["Key"] * 4 + ["ALPC Port", "IoCompletion", "Semaphore",
                 "Mutant", "Section", "TpWorkerFactory", "WaitCompletionPacket", "IRTimer", "Thread",
                 "EtwRegistration", "Token", "Timer", "Desktop", "WindowStation"]
        kinds = [k for k in kinds if k in self.types or k in ("File", "Key", "Thread", "Token")]
        for _ in range(n - 3):
            kind = rng.choice(kinds)
            if kind == "Event":
                named = rng.random() < 0.3
                obj = cat.generic("Event", rng.choice(EVENT_NAMES) if named else None, bno)
            elif kind == "Mutant":
                obj = cat.generic("Mutant", rng.choice(MUTANT_NAMES), bno)
            elif kind == "Section":
                named = rng.random() < 0.5
                obj = cat.generic("Section", rng.choice(SECTION_NAMES) if named else None, bno)
            elif kind == "File":
                obj = cat.file(rng.choice(FILES))
            elif kind == "Key":
                hive = rng.random() < 0.8
                path = ("\\REGISTRY\\MACHINE\\" + rng.choice(SYSTEM_KEYS)) if hive else \
                    f"\\REGISTRY\\USER\\{USER_SID}\\" + rng.choice(USER_KEYS)
                obj = cat.key(path, proc.pid)
            elif kind == "Thread":
                obj = rng.choice(proc.threads).obj
            elif kind == "Token":
                obj = proc.token
            elif kind == "ALPC Port":
                obj = cat.generic("ALPC Port", f"OLE{rng.randrange(1 << 64):016X}" if rng.random() < 0.2
                                  else None, "\\RPC Control")
            else:
                obj = cat.generic(kind)
            self.open(proc, obj)

    def processes(self, specs) -> list:
        """Create processes (name, pid, ppid) with 1-4 threads each (System: more)."""
        out = []
        self.w.pb.ids.update(pid for _, pid, _ in specs)
        for name, pid, ppid in specs:
            p = self.w.process(name, pid, ppid, exiting=name == "WerFault.exe")
            for _ in range(12 if pid == 4 else self.rng.randrange(1, 5)):
                self.w.thread(p)
            out.append(p)
        return out

    def kernel_handles(self, system, n: int) -> None:
        """System's table: the kernel handles."""
        cat, rng = self.w.cat, self.rng
        for path in KERNEL_FILES:
            self.open(system, cat.file(path), 0x12019F, 0)
        for k in SYSTEM_KEYS:
            self.open(system, cat.key("\\REGISTRY\\MACHINE\\" + k, 4), 0xF003F, 0)
        self.open(system, cat.symlink("C:", "\\GLOBAL??", "\\Device\\HarddiskVolume3"), 0xF0001, 0)
        self.open(system, cat.directory("\\KernelObjects"), 0xF000F, 0)
        self.open(system, cat.generic("KeyedEvent", "CritSecOutOfMemoryEvent", "\\KernelObjects"), 0xF0003, 0)
        for t in system.threads[:6]:
            self.open(system, t.obj, 0x1FFFFF, 0)
        self.open(system, system.token, 0xF01FF, 0)
        kinds = [k for k in ("Event", "Section", "WaitCompletionPacket", "TpWorkerFactory", "Key",
                             "EtwRegistration", "IoCompletion", "Partition", "Timer", "File", "Callback")
                 if k in self.types or k in ("Key", "File")]
        while len(system.table.slots) < n:
            kind = rng.choice(kinds)
            if kind == "Key":
                obj = cat.key("\\REGISTRY\\MACHINE\\" + rng.choice(SYSTEM_KEYS), 4)
            elif kind == "File":
                obj = cat.file(rng.choice(KERNEL_FILES))
            elif kind == "Event" and rng.random() < 0.2:
                obj = cat.generic("Event", rng.choice(["LowMemoryCondition", "HighMemoryCondition",
                                                       "MaximumCommitCondition"]), "\\KernelObjects")
            elif kind == "Callback":
                obj = cat.generic("Callback", rng.choice(["PowerState", "ProcessorAdd", "SetSystemTime"]),
                                  "\\Callback")
            else:
                obj = cat.generic(kind)
            self.open(system, obj, self.access(kind), 0)

    def cross_handles(self, holder, targets, share: float = 1.0) -> None:
        """Process and thread handles `holder` keeps to other processes (csrss, services...)."""
        for p in targets:
            if p is holder or p.exiting or self.rng.random() > share:
                continue
            self.open(holder, p.obj)
            self.open(holder, p.threads[0].obj)

    def free_some(self, proc, fraction: float) -> None:
        """Close a few handles so that freed entries sit between used ones."""
        values = [v for v, _ in proc.table.used]
        for v in self.rng.sample(values[:-1], int(len(values) * fraction)):
            proc.table.free(v)


def default(pop: Population, *, extra_explorer: int = 300) -> list:
    """System + the usual session processes; System and explorer use level-1 tables."""
    procs = pop.processes(WIN10_PROCESSES)
    by = {p.name: p for p in procs}
    system = procs[0]
    pop.kernel_handles(system, 300)
    for p in procs[1:]:
        if p.exiting:
            continue
        n = {"smss.exe": 40, "csrss.exe": 60, "wininit.exe": 50, "services.exe": 90, "lsass.exe": 110,
             "explorer.exe": extra_explorer}.get(p.name, pop.rng.randrange(60, 140))
        pop.mix(p, n, session=p.name in ("explorer.exe", "csrss.exe"))
    pop.cross_handles(by["csrss.exe"], procs)
    pop.cross_handles(by["services.exe"], [p for p in procs if p.name == "svchost.exe"])
    pop.cross_handles(by["lsass.exe"], procs, share=0.5)
    pop.cross_handles(by["explorer.exe"], procs[4:], share=0.4)
    for p in procs:
        if p.table is not None:
            pop.free_some(p, 0.08)
    return procs


def big(pop: Population) -> list:
    """>= 200 processes and >= 50,000 handles."""
    return more_processes(pop, default(pop), 200, (120, 420))


def more_processes(pop: Population, procs: list, count: int, handles: tuple[int, int],
                   spread_every: int = 0) -> list:
    """`procs` and `count` more processes of BIG_NAMES above pid 5000, each with randrange(*handles)
    handles, every 7th holding handles of 5 others, every `spread_every`th a level-2 table."""
    rng = pop.rng
    pid = 5000
    for i in range(count):
        pid = pop.w.pb.new_id(pid + 4 * rng.randrange(2, 40))
        pop.w.pb.ids.discard(pid)
        p = pop.processes([(rng.choice(BIG_NAMES), pid, rng.choice(procs).pid)])[0]
        pop.mix(p, rng.randrange(*handles))
        if i % 7 == 0:
            pop.cross_handles(p, rng.sample(procs, 5))
        pop.free_some(p, 0.05)
        if spread_every and i % spread_every == 0:
            spread_table(pop, p, 4000)
        procs.append(p)
    return procs


def spread_table(pop: Population, p, count: int) -> None:
    """`count` handles spread over more than 131072 slots of p's table: a level-2 table."""
    rng, cat = pop.rng, pop.w.cat
    top = 131072 + 256 * rng.randrange(4, 24)
    for index in sorted(rng.sample(range(257, top), count)):
        if index % 256 == 0 or index in p.table.slots:
            continue
        obj = cat.generic("Event") if rng.random() < 0.7 else cat.file(rng.choice(FILES))
        pop.w.handle(p, obj, pop.access(obj.type), attributes(rng), index=index)
    p.table.next_index = top    # later opens go after the spread


def level2(pop: Population) -> list:
    """default, plus one process whose table spans more than 131072 slots (a level-2 table)."""
    procs = default(pop)
    p = pop.processes([("dbserver.exe", 6120, procs[4].pid)])[0]
    pop.mix(p, 200)
    spread_table(pop, p, 3000)
    procs.append(p)
    return procs


def huge(pop: Population) -> list:
    """The scale test: >= 400 processes, >= 250,000 handles, five level-2 tables, 2 GiB of RAM."""
    return more_processes(pop, default(pop), 410, (520, 820), spread_every=100)


def churn(pop: Population) -> list:
    """default; one svchost.exe's table page flips between two states while the guest runs."""
    from .churn import state_b
    procs = default(pop)
    proc = next(p for p in procs if p.name == "svchost.exe")
    pop.w.churn = (proc, state_b(pop, proc))
    return procs


def leak(pop: Population) -> list:
    """default, plus leaky.exe, which the guest kernel makes gain handles while it runs,
    and other processes opening and closing handles in balance (leak.py)."""
    from .leak import plan
    procs = default(pop)
    pop.w.leak = plan(pop, procs)
    return procs


SCENARIOS = {"default": default, "kpti": default, "churn": churn, "big": big, "level2": level2, "leak": leak,
             "huge": huge}
