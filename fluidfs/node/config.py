"""What a node needs to start: NodeConfig and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from fluidfs.blocks.audit import AuditPolicy
from fluidfs.blocks.repair import RepairPolicy
from fluidfs.keys import KeyRing
from fluidfs.net.limits import DEFAULT_LIMITS, NetLimits
from fluidfs.peers.agreements import DEFAULT_TERM
from fluidfs.peers.discovery import DiscoveryPolicy
from fluidfs.peers.lifecycle import LifecyclePolicy
from fluidfs.peers.portmap import PortMapPolicy
from fluidfs.peers.reach import ReachPolicy
from fluidfs.peers.relay import RelayPolicy
from fluidfs.peers.relayclient import RelayClientPolicy
from fluidfs.peers.trust import TrustPolicy
from fluidfs.remount.options import RemountOptions
from fluidfs.service.customer_repair import RepairForCustomersPolicy
from fluidfs.statedir import StateDir

# For a new state (a used one keeps its own, restores adopt the backup's): 8 MiB halves
# the seals, shard calls and record writes per GiB of 4 MiB (docs/decisions.md, "Block
# size 8 MiB"); cli/options.py's --block-size default says the same.
DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024
DEFAULT_CACHE_SIZE = 1 << 30
DEFAULT_DONATE = 16 << 30
DEFAULT_RATIO = 1.5


@dataclass
class NodeConfig:
    """What a node needs to start (test-only misbehaviour is service/faults.py, apart)."""

    keyring: KeyRing
    state: StateDir
    cache_size: int = DEFAULT_CACHE_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE  # for a new state; a used one keeps its own
    worker_threads: int = 4
    listen: str | None = None
    donate: int = DEFAULT_DONATE
    bootstrap: list[str] = field(default_factory=list)
    ratio: float = DEFAULT_RATIO
    term: int = DEFAULT_TERM
    stores_data: bool = True  # False for `fluidfs serve`: accept agreements, propose none
    discovery: DiscoveryPolicy | None = None
    audit: AuditPolicy = field(default_factory=AuditPolicy)
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    repair: RepairPolicy = field(default_factory=RepairPolicy)
    trust: TrustPolicy = field(default_factory=TrustPolicy)
    even_placement: bool = False  # benchmark baseline: place uniformly at random
    repair_threshold: int | None = None  # repair at this many live shards or fewer; N-1
    remount: RemountOptions = field(default_factory=RemountOptions)  # commits, lease, restore
    net_limits: NetLimits = DEFAULT_LIMITS  # peer port caps, timeouts, budgets (net/limits.py)
    reach: ReachPolicy = field(default_factory=ReachPolicy)  # address records (peers/reach.py)
    portmap: PortMapPolicy = field(default_factory=PortMapPolicy)  # UPnP (peers/portmap.py)
    relay: RelayPolicy | None = None  # relay for undialable peers (serve --relay); None: off
    relay_via: tuple[str, ...] = ()  # relays to keep registrations at (--relay-via)
    relay_client: RelayClientPolicy | None = None  # None: from relay_via (tests shorten it)
    limit_upload: float | None = None  # bytes/s to all peers (net/bandwidth.py); None: off
    limit_download: float | None = None  # bytes/s from all peers
    web: str | None = None  # HOST:PORT of the status and restore page (fluidfs/web/); None: off
    web_refresh: float = 5.0  # seconds between the page's status polls
    provider: bool = False  # serve as a storage provider for admitted customers
    use_provider: tuple[bytes, str] | None = None  # (id, HOST:PORT) holding our side
    provider_repairs: bool = False  # let use_provider repair our blocks while we are away
    # a provider's repairs for away customers (service/customer_repair.py)
    customer_repairs: RepairForCustomersPolicy = field(default_factory=RepairForCustomersPolicy)
