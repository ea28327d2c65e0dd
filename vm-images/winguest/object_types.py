"""Object types per build family: the real ObTypeIndexTable order, pool tags, access masks."""
from __future__ import annotations

WIN7 = """Type Directory SymbolicLink Token Job Process Thread UserApcReserve IoCompletionReserve
DebugObject Event EventPair Mutant Callback Semaphore Timer Profile KeyedEvent WindowStation Desktop
TpWorkerFactory Adapter Controller Device Driver IoCompletion File TmTm TmTx TmRm TmEn Section
Session Key ALPC_Port PowerRequest WmiGuid EtwRegistration EtwConsumer FilterConnectionPort
FilterCommunicationPort PcwObject"""

WIN8 = """Type Directory SymbolicLink Token Job Process Thread UserApcReserve IoCompletionReserve
DebugObject Event Mutant Callback Semaphore Timer IRTimer Profile KeyedEvent WindowStation Desktop
Composition RawInputManager TpWorkerFactory Adapter Controller Device Driver IoCompletion
WaitCompletionPacket File TmTm TmTx TmRm TmEn Section Session Key ALPC_Port PowerRequest WmiGuid
EtwRegistration EtwConsumer DmaAdapter DmaDomain PcwObject FilterConnectionPort
FilterCommunicationPort NdisCmState DxgkSharedResource DxgkSharedSyncObject DxgkSharedSwapChainObject"""

WIN10 = """Type Directory SymbolicLink Token Job Process Thread Partition UserApcReserve
IoCompletionReserve ActivityReference PsSiloContextPaged PsSiloContextNonPaged DebugObject Event
Mutant Callback Semaphore Timer IRTimer Profile KeyedEvent WindowStation Desktop Composition
RawInputManager CoreMessaging ActivationObject TpWorkerFactory Adapter Controller Device Driver
IoCompletion WaitCompletionPacket File TmTm TmTx TmRm TmEn Section Session Key RegistryTransaction
ALPC_Port EnergyTracker PowerRequest WmiGuid EtwRegistration EtwSessionDemuxEntry EtwConsumer
CoverageSampler DmaAdapter PcwObject FilterConnectionPort FilterCommunicationPort NdisCmState
DxgkSharedResource DxgkSharedKeyedMutexObject DxgkSharedSyncObject DxgkSharedSwapChainObject
DxgkDisplayManagerObject DxgkCurrentDxgProcessObject DxgkSharedProtectedSessionObject
DxgkSharedBundleObject DxgkCompositionObject VRegConfigurationContext"""

WIN11 = """Type Directory SymbolicLink Token Job Process Thread Partition UserApcReserve
IoCompletionReserve ActivityReference ProcessStateChange ThreadStateChange CpuPartition
PsSiloContextPaged PsSiloContextNonPaged DebugObject Event Mutant Callback Semaphore Timer IRTimer
Profile KeyedEvent WindowStation Desktop Composition RawInputManager CoreMessaging ActivationObject
TpWorkerFactory Adapter Controller Device Driver IoCompletion WaitCompletionPacket File TmTm TmTx
TmRm TmEn Section Session Key RegistryTransaction DmaAdapter ALPC_Port EnergyTracker PowerRequest
WmiGuid EtwRegistration EtwSessionDemuxEntry EtwConsumer CoverageSampler PcwObject
FilterConnectionPort FilterCommunicationPort NdisCmState DxgkSharedResource
DxgkSharedKeyedMutexObject DxgkSharedSyncObject DxgkSharedSwapChainObject DxgkDisplayManagerObject
DxgkCurrentDxgProcessObject DxgkSharedProtectedSessionObject DxgkSharedBundleObject
DxgkCompositionObject VRegConfigurationContext"""

# Types that appeared during Windows 10's life (absent from earlier builds of the family).
WIN10_ADDED = {
    14393: ["Partition", "ActivityReference", "PsSiloContextPaged", "PsSiloContextNonPaged",
            "CoreMessaging", "EtwSessionDemuxEntry"],
    15063: ["ActivationObject"],
    16299: ["EnergyTracker"],
    17134: ["RegistryTransaction", "CoverageSampler"],
}


def _names(text: str) -> list[str]:
    return [n.replace("_", " ") for n in text.split()]


def type_names(build: int) -> list[str]:
    """Type names in ObTypeIndexTable order, starting at index 2."""
    if build < 9200:
        return _names(WIN7)
    if build < 10240:
        names = _names(WIN8)
        return [n for n in names if n not in ("IRTimer", "DmaDomain")] if build < 9600 else names
    if build >= 20348:
        names = _names(WIN11)
        return names if build >= 22000 else [n for n in names if n != "CpuPartition"]
    names = _names(WIN10)
    missing = {n for b, added in WIN10_ADDED.items() if build < b for n in added}
    return [n for n in names if n not in missing]


# Pool tag of each type's objects (the type's Key), for the types the guests instantiate.
TAGS = {
    "Type": "ObjT", "Directory": "Dire", "SymbolicLink": "Symb", "Token": "Toke", "Job": "Job ",
    "Process": "Proc", "Thread": "Thre", "Event": "Even", "Mutant": "Muta", "Semaphore": "Sema",
    "Timer": "Time", "IRTimer": "IRTi", "KeyedEvent": "Keye", "WindowStation": "Wind",
    "Desktop": "Desk", "TpWorkerFactory": "TpWo", "Device": "Devi", "Driver": "Driv",
    "IoCompletion": "IoCo", "WaitCompletionPacket": "Wait", "File": "File", "Section": "Sect",
    "Key": "Key ", "ALPC Port": "ALPC", "EtwRegistration": "EtwR", "Callback": "Call",
    "DebugObject": "Debu", "PowerRequest": "Powe", "Partition": "Part", "Composition": "Comp",
}

# ValidAccessMask of _OBJECT_TYPE_INITIALIZER (its generic-all rights).
VALID_ACCESS = {
    "Process": 0x1FFFFF, "Thread": 0x1FFFFF, "Event": 0x1F0003, "Mutant": 0x1F0001,
    "Semaphore": 0x1F0003, "Timer": 0x1F0003, "Section": 0xF001F, "File": 0x1F01FF,
    "Key": 0xF003F, "Token": 0xF01FF, "Directory": 0xF000F, "SymbolicLink": 0xF0001,
    "ALPC Port": 0x1F0001, "IoCompletion": 0x1F0003, "TpWorkerFactory": 0xF00FF,
    "Job": 0x1F003F, "Desktop": 0xF01FF, "WindowStation": 0xF037F, "Type": 0xF0001,
}
