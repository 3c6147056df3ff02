//! What a machine is and what its last boot took: [`MachineState`] and
//! [`BootTimings`], the same whichever engine runs it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The monitor's own set-up phases (re-exported from `smol_vmm`).
pub use smol_vmm::BootTimings as VmSetupTimings;

/// Where a machine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Recorded, never booted yet.
    Created,
    Running,
    Stopped,
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MachineState::Created => "created",
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
        })
    }
}

/// How long the last boot of a machine took, phase by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// Record, directory and disk (format included); zero for `start`.
    pub prepare: Duration,
    /// Building the VM on the host (`Vm::start`), up to its first run.
    pub vm_setup: Duration,
    /// From the VM running to the agent answering its first Hello.
    pub agent_ready: Duration,
    /// The whole `create` or `start`.
    pub total: Duration,
    /// The monitor's breakdown of `vm_setup`.
    pub vmm: VmSetupTimings,
    /// Restored from a snapshot (a warm create, `restore` or `fork`)
    /// rather than booted.
    pub restored: bool,
}

/// A machine as [`Machine::list`](crate::Machine::list) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    /// `Running` when a live process has the machine open and its VM's
    /// socket is there; `Stopped` otherwise (a machine on disk).
    pub state: MachineState,
    pub persistent: bool,
    /// Seconds since the epoch; `None` where the engine does not say.
    pub created_unix: Option<u64>,
    pub config: crate::config::MachineConfig,
    /// The process that has the machine open, if one does (local engine).
    pub owner_pid: Option<u32>,
    /// Why this smol cannot read the machine's record (truncated, corrupt,
    /// written by a newer smol), when it cannot: the machine is kept as it
    /// is, `config` is then the default and the other fields are what
    /// could be made out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// A host listener of a running machine and the guest port it relays to
/// (see [`PortSpec`](crate::PortSpec)): `host` is the port actually bound,
/// also when the spec asked for any free one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub address: std::net::IpAddr,
    pub host: u16,
    pub guest: u16,
}

impl PortMapping {
    /// `address:host`, what a client connects to.
    pub fn host_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.address, self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names() {
        assert_eq!(MachineState::Running.to_string(), "running");
        assert_eq!(
            serde_json::to_string(&MachineState::Stopped).unwrap(),
            "\"stopped\""
        );
    }
}
