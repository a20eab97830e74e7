"""Hardware topologies to plan for: presets of current devices, ``NODESxDEVICESxKIND`` specs, YAML.

torchrec's planner defaults describe old hardware (32 GB HBM, 897 GB/s). The presets below carry
the vendors' published figures; any field can be overridden. Bandwidths are per device and per
direction, in GB/s (1e9 bytes); memory in GiB.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from shardrec.errors import ConfigError

GB = 1e9
GiB = 1024**3


@dataclass(kw_only=True)
class DeviceSpec:
    """One accelerator (or a CPU socket share) and the links around it."""

    compute_device: Literal["cuda", "cpu"]
    """Device type the planner models."""
    hbm_gib: float
    """Device memory (0 for cpu)."""
    hbm_bw_gbs: float
    """Device memory bandwidth."""
    intra_node_gbs: float
    """Device-to-device bandwidth inside a node (NVLink, or PCIe)."""
    inter_node_gbs: float
    """Network bandwidth per device across nodes."""
    ddr_gib_per_node: float
    """Host memory of a node, shared by its devices (UVM and CPU tables live there)."""
    ddr_bw_gbs: float = 200.0
    """Host memory bandwidth per node."""
    hbm_to_ddr_gbs: float = 32.0
    """Device <-> host bandwidth (PCIe), used for UVM."""


PRESETS: dict[str, DeviceSpec] = {
    # H100 SXM: 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total (450 per direction), 400 Gb/s NDR per GPU.
    "H100": DeviceSpec(compute_device="cuda", hbm_gib=80, hbm_bw_gbs=3350, intra_node_gbs=450, inter_node_gbs=50, ddr_gib_per_node=2048, hbm_to_ddr_gbs=64),
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s, same links as H100.
    "H200": DeviceSpec(compute_device="cuda", hbm_gib=141 * GB / GiB, hbm_bw_gbs=4800, intra_node_gbs=450, inter_node_gbs=50, ddr_gib_per_node=2048, hbm_to_ddr_gbs=64),
    # A100 SXM: 40 GB at 1.555 TB/s or 80 GB at 2.039 TB/s, NVLink 3 600 GB/s total, 200 Gb/s HDR per GPU.
    "A100-40GB": DeviceSpec(compute_device="cuda", hbm_gib=40, hbm_bw_gbs=1555, intra_node_gbs=300, inter_node_gbs=25, ddr_gib_per_node=1024, hbm_to_ddr_gbs=32),
    "A100-80GB": DeviceSpec(compute_device="cuda", hbm_gib=80, hbm_bw_gbs=2039, intra_node_gbs=300, inter_node_gbs=25, ddr_gib_per_node=1024, hbm_to_ddr_gbs=32),
    # L4: 24 GB GDDR6 at 300 GB/s, PCIe Gen4 x16 (no NVLink), 100 Gb/s Ethernet per node shared.
    "L4": DeviceSpec(compute_device="cuda", hbm_gib=24, hbm_bw_gbs=300, intra_node_gbs=25, inter_node_gbs=3, ddr_gib_per_node=384, hbm_to_ddr_gbs=25),
    # A CPU rank: tables in host memory; 25 Gb/s Ethernet.
    "CPU": DeviceSpec(compute_device="cpu", hbm_gib=0, hbm_bw_gbs=0, intra_node_gbs=20, inter_node_gbs=3, ddr_gib_per_node=256, ddr_bw_gbs=100),
}
_ALIASES = {"A100": "A100-80GB", "H100-80GB": "H100", "H200-141GB": "H200"}


@dataclass(kw_only=True)
class TopologyConfig:
    """A cluster to plan for: nodes x devices per node of one device kind, with overrides."""

    nodes: int = 1
    """Number of hosts."""
    devices_per_node: int = 8
    """Ranks per host."""
    device: str = "H100"
    """Preset name: H100, H200, A100-40GB, A100-80GB, L4 or CPU."""
    hbm_gib: float | None = None
    """Override of the preset's device memory."""
    ddr_gib_per_node: float | None = None
    """Override of the preset's host memory per node."""
    intra_node_gbs: float | None = None
    """Override of the preset's intra-node bandwidth per device."""
    inter_node_gbs: float | None = None
    """Override of the preset's inter-node bandwidth per device."""
    batch_size_per_rank: int = 512
    """Samples per rank per step, which the planner's time estimates scale with."""

    def __post_init__(self) -> None:
        if self.nodes <= 0 or self.devices_per_node <= 0:
            raise ConfigError(f"topology: nodes and devices_per_node must be > 0, got {self.nodes} and {self.devices_per_node}")
        if _preset_name(self.device) is None:
            raise ConfigError(f"topology.device: unknown device '{self.device}'; known: {', '.join(PRESETS)}")
        if self.batch_size_per_rank <= 0:
            raise ConfigError(f"topology.batch_size_per_rank must be > 0, got {self.batch_size_per_rank}")

    @property
    def world_size(self) -> int:
        """Total ranks."""
        return self.nodes * self.devices_per_node

    def spec(self) -> DeviceSpec:
        """The preset with this config's overrides applied."""
        base = PRESETS[_preset_name(self.device)]  # type: ignore[index]
        overrides = {
            k: v
            for k, v in (
                ("hbm_gib", self.hbm_gib),
                ("ddr_gib_per_node", self.ddr_gib_per_node),
                ("intra_node_gbs", self.intra_node_gbs),
                ("inter_node_gbs", self.inter_node_gbs),
            )
            if v is not None
        }
        return dataclasses.replace(base, **overrides)


def _preset_name(name: str) -> str | None:
    upper = {k.upper(): k for k in PRESETS}
    key = _ALIASES.get(name.upper(), name).upper()
    return upper.get(key)


_SPEC = re.compile(r"^(?:(\d+)x)?(\d+)x([A-Za-z0-9-]+)$")


def parse_topology(text: str) -> TopologyConfig:
    """Parses ``NODESxDEVICESxKIND`` (e.g. ``4x8xH100``) or ``DEVICESxKIND`` (one node, e.g. ``8xH200``)."""
    m = _SPEC.match(text.strip())
    if not m or m.group(3).isdigit():
        raise ConfigError(
            f"--topology '{text}' is not NODESxDEVICESxKIND (e.g. 4x8xH100) or DEVICESxKIND (e.g. 8xH200); "
            f"kinds: {', '.join(PRESETS)}"
        )
    nodes, devices, kind = m.groups()
    try:
        return TopologyConfig(nodes=int(nodes or 1), devices_per_node=int(devices), device=kind)
    except ConfigError as e:
        raise ConfigError(f"--topology '{text}': {e}") from None
