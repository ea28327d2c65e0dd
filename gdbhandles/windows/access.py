"""Granted-access masks as the right names of the object's type (winnt.h / ntddk values)."""

from __future__ import annotations

STANDARD = {
    0x00010000: "DELETE", 0x00020000: "READ_CONTROL", 0x00040000: "WRITE_DAC",
    0x00080000: "WRITE_OWNER", 0x00100000: "SYNCHRONIZE", 0x01000000: "ACCESS_SYSTEM_SECURITY",
    0x02000000: "MAXIMUM_ALLOWED", 0x10000000: "GENERIC_ALL", 0x20000000: "GENERIC_EXECUTE",
    0x40000000: "GENERIC_WRITE", 0x80000000: "GENERIC_READ",
}
STANDARD_COMPOSITES = {0x000F0000: "STANDARD_RIGHTS_REQUIRED"}


def _bits(prefix: str, *names: str) -> dict[int, str]:
    """Specific rights 0x1, 0x2, 0x4 … in order; an empty name skips a bit."""
    return {1 << i: prefix + name for i, name in enumerate(names) if name}


# Per type: (specific rights, composites such as *_ALL_ACCESS).
RIGHTS: dict[str, tuple[dict[int, str], dict[int, str]]] = {
    "Event": (_bits("EVENT_", "QUERY_STATE", "MODIFY_STATE"), {0x1F0003: "EVENT_ALL_ACCESS"}),
    "Mutant": (_bits("MUTANT_", "QUERY_STATE"), {0x1F0001: "MUTANT_ALL_ACCESS"}),
    "Semaphore": (_bits("SEMAPHORE_", "QUERY_STATE", "MODIFY_STATE"), {0x1F0003: "SEMAPHORE_ALL_ACCESS"}),
    "Timer": (_bits("TIMER_", "QUERY_STATE", "MODIFY_STATE"), {0x1F0003: "TIMER_ALL_ACCESS"}),
    "IoCompletion": (_bits("IO_COMPLETION_", "QUERY_STATE", "MODIFY_STATE"),
                     {0x1F0003: "IO_COMPLETION_ALL_ACCESS"}),
    "KeyedEvent": (_bits("KEYEDEVENT_", "WAIT", "WAKE"), {0xF0003: "KEYEDEVENT_ALL_ACCESS"}),
    "Section": (_bits("SECTION_", "QUERY", "MAP_WRITE", "MAP_READ", "MAP_EXECUTE", "EXTEND_SIZE",
                      "MAP_EXECUTE_EXPLICIT"), {0xF001F: "SECTION_ALL_ACCESS"}),
    "Directory": (_bits("DIRECTORY_", "QUERY", "TRAVERSE", "CREATE_OBJECT", "CREATE_SUBDIRECTORY"),
                  {0xF000F: "DIRECTORY_ALL_ACCESS"}),
    "SymbolicLink": (_bits("SYMBOLIC_LINK_", "QUERY"), {0xF0001: "SYMBOLIC_LINK_ALL_ACCESS"}),
    "Key": (_bits("KEY_", "QUERY_VALUE", "SET_VALUE", "CREATE_SUB_KEY", "ENUMERATE_SUB_KEYS", "NOTIFY",
                  "CREATE_LINK", "", "", "WOW64_64KEY", "WOW64_32KEY"),
            {0xF003F: "KEY_ALL_ACCESS", 0x20019: "KEY_READ", 0x20006: "KEY_WRITE"}),
    "File": (_bits("FILE_", "READ_DATA", "WRITE_DATA", "APPEND_DATA", "READ_EA", "WRITE_EA", "EXECUTE",
                   "DELETE_CHILD", "READ_ATTRIBUTES", "WRITE_ATTRIBUTES"),
             {0x1F01FF: "FILE_ALL_ACCESS", 0x120089: "FILE_GENERIC_READ", 0x120116: "FILE_GENERIC_WRITE",
              0x1200A0: "FILE_GENERIC_EXECUTE"}),
    "Process": (_bits("PROCESS_", "TERMINATE", "CREATE_THREAD", "SET_SESSIONID", "VM_OPERATION", "VM_READ",
                      "VM_WRITE", "DUP_HANDLE", "CREATE_PROCESS", "SET_QUOTA", "SET_INFORMATION",
                      "QUERY_INFORMATION", "SUSPEND_RESUME", "QUERY_LIMITED_INFORMATION",
                      "SET_LIMITED_INFORMATION"), {0x1FFFFF: "PROCESS_ALL_ACCESS"}),
    "Thread": (_bits("THREAD_", "TERMINATE", "SUSPEND_RESUME", "ALERT", "GET_CONTEXT", "SET_CONTEXT",
                     "SET_INFORMATION", "QUERY_INFORMATION", "SET_THREAD_TOKEN", "IMPERSONATE",
                     "DIRECT_IMPERSONATION", "SET_LIMITED_INFORMATION", "QUERY_LIMITED_INFORMATION",
                     "RESUME"), {0x1FFFFF: "THREAD_ALL_ACCESS"}),
    "Token": (_bits("TOKEN_", "ASSIGN_PRIMARY", "DUPLICATE", "IMPERSONATE", "QUERY", "QUERY_SOURCE",
                    "ADJUST_PRIVILEGES", "ADJUST_GROUPS", "ADJUST_DEFAULT", "ADJUST_SESSIONID"),
              {0xF01FF: "TOKEN_ALL_ACCESS", 0x20008: "TOKEN_READ", 0x200E0: "TOKEN_WRITE"}),
    "Job": (_bits("JOB_OBJECT_", "ASSIGN_PROCESS", "SET_ATTRIBUTES", "QUERY", "TERMINATE",
                  "SET_SECURITY_ATTRIBUTES", "IMPERSONATE"), {0x1F003F: "JOB_OBJECT_ALL_ACCESS"}),
    "DebugObject": (_bits("DEBUG_", "READ_EVENT", "PROCESS_ASSIGN", "SET_INFORMATION", "QUERY_INFORMATION"),
                    {0x1F000F: "DEBUG_ALL_ACCESS"}),
    "ALPC Port": (_bits("PORT_", "CONNECT"), {0x1F0001: "PORT_ALL_ACCESS"}),
    "TpWorkerFactory": (_bits("WORKER_FACTORY_", "RELEASE_WORKER", "WAIT", "SET_INFORMATION",
                              "QUERY_INFORMATION", "READY_WORKER", "SHUTDOWN"),
                        {0xF003F: "WORKER_FACTORY_ALL_ACCESS"}),
    "WindowStation": (_bits("WINSTA_", "ENUMDESKTOPS", "READATTRIBUTES", "ACCESSCLIPBOARD", "CREATEDESKTOP",
                            "WRITEATTRIBUTES", "ACCESSGLOBALATOMS", "EXITWINDOWS", "", "ENUMERATE",
                            "READSCREEN"), {0x37F: "WINSTA_ALL_ACCESS"}),
    "Desktop": (_bits("DESKTOP_", "READOBJECTS", "CREATEWINDOW", "CREATEMENU", "HOOKCONTROL",
                      "JOURNALRECORD", "JOURNALPLAYBACK", "ENUMERATE", "WRITEOBJECTS", "SWITCHDESKTOP"),
                {}),
}


def rights(type_name: str | None, mask: int) -> list[str]:
    """Names for the bits of `mask`: the type's composites first, then single rights, then
    standard and generic rights; bits no name covers come last as hex."""
    specific, composites = RIGHTS.get(type_name or "", ({}, {}))
    if mask in composites:
        return [composites[mask]]
    picked, left = [], mask
    for table in (composites, STANDARD_COMPOSITES):
        for value, name in sorted(table.items(), key=lambda item: -bin(item[0]).count("1")):
            if value & mask == value and value & left:
                picked.append((value, name))
                left &= ~value
    names = [name for _value, name in sorted(picked)]
    for table in (specific, STANDARD):
        for value, name in sorted(table.items()):
            if value & left:
                names.append(name)
                left &= ~value
    if left:
        names.append(f"{left:#x}")
    return names


def describe(type_name: str | None, mask: int) -> str:
    """`0x1f0003 EVENT_ALL_ACCESS`: the mask and its names."""
    names = rights(type_name, mask)
    return f"{mask:#x} {'|'.join(names)}" if names and names != [f"{mask:#x}"] else f"{mask:#x}"


ATTRIBUTE_NAMES = {1: "ProtectFromClose", 2: "Inherit", 4: "Audit"}


def attribute_names(attributes: int) -> list[str]:
    return [name for bit, name in ATTRIBUTE_NAMES.items() if attributes & bit]
