//! The image types the host and the guest share: an image's runtime
//! config (and docker's rules for the command it runs), the record of an
//! image in a machine, and the container an exec runs in.

use serde::{Deserialize, Serialize};

/// The image has neither an entrypoint nor a cmd, and the caller gave no
/// command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the image has no command: give one (no entrypoint or cmd in its config)")]
pub struct NoCommand;

/// The runtime part of an image config (the OCI `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `uid`, `uid:gid`, `name` or `name:group`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// The PATH a container gets when its image sets none (docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A command as it runs in a container of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: Option<String>,
}

impl ImageConfig {
    /// Applies docker's rules: `argv` replaces Cmd, Entrypoint is prefixed;
    /// the image's Env is overlaid by `env`; `workdir` overrides WorkingDir.
    pub fn resolve(
        &self,
        argv: &[String],
        env: &[(String, String)],
        workdir: Option<&str>,
    ) -> Result<ResolvedCommand, NoCommand> {
        let mut full = self.entrypoint.clone();
        full.extend_from_slice(if argv.is_empty() { &self.cmd } else { argv });
        if full.is_empty() {
            return Err(NoCommand);
        }
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: &str| match vars.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => vars.push((k.to_string(), v.to_string())),
        };
        set("PATH", DEFAULT_PATH);
        for e in &self.env {
            if let Some((k, v)) = e.split_once('=') {
                if !k.is_empty() {
                    set(k, v);
                }
            }
        }
        for (k, v) in env {
            set(k, v);
        }
        let workdir = workdir
            .map(str::to_string)
            .or_else(|| self.working_dir.clone())
            .unwrap_or_else(|| "/".into());
        Ok(ResolvedCommand {
            argv: full,
            env: vars,
            workdir,
            user: self.user.clone(),
        })
    }
}

/// One layer of a recorded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// An image as the machine knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest digest.
    pub digest: String,
    /// Every reference this image was recorded under, newest first (a tag
    /// moves to the newest image recorded with it).
    #[serde(default)]
    pub references: Vec<String>,
    /// Bottom layer first.
    pub layers: Vec<LayerRecord>,
    #[serde(default)]
    pub config: ImageConfig,
    #[serde(default)]
    pub created: Option<String>,
    /// Compressed layers plus config, in bytes.
    #[serde(default)]
    pub size: u64,
}

/// The container an exec runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The image's manifest digest (or a reference it was recorded under).
    pub image: String,
    /// `uid[:gid]` or a user name looked up in the image's /etc/passwd.
    #[serde(default)]
    pub user: Option<String>,
    /// The container's hostname; the image digest's first 12 hex digits when absent.
    #[serde(default)]
    pub hostname: Option<String>,
}
