//! Registry credentials from the standard docker client config
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
//!
//! Only inline credentials are read (`auth`: base64 of `user:password`, or
//! `username` and `password`); credential helpers are not run.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::error::ImageError;
use super::reference::DOCKER_HUB;

/// Credentials per registry host (`host[:port]`).
#[derive(Debug, Default, Clone)]
pub struct DockerCredentials {
    auths: HashMap<String, (String, String)>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: HashMap<String, RawAuth>,
}

#[derive(Deserialize)]
struct RawAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Where the docker client keeps its config.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://index.docker.io/v1/` → `docker.io`; `localhost:5000` stays.
fn normalize(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

impl DockerCredentials {
    /// Reads `path`; a missing file means no credentials, a malformed one
    /// is an error naming it.
    pub fn load(path: &Path) -> Result<DockerCredentials, ImageError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerCredentials::default())
            }
            Err(e) => return Err(ImageError::io("read", path, e)),
        };
        Self::parse(path, &bytes)
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<DockerCredentials, ImageError> {
        let bad = |reason: String| ImageError::Credentials {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let mut auths = HashMap::new();
        for (key, a) in raw.auths {
            let pair = match (a.auth, a.username, a.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| bad(format!("auth of {key:?} is not base64")))?;
                    let text = String::from_utf8(decoded)
                        .map_err(|_| bad(format!("auth of {key:?} is not UTF-8")))?;
                    let (u, p) = text
                        .split_once(':')
                        .ok_or_else(|| bad(format!("auth of {key:?} is not user:password")))?;
                    (u.to_string(), p.to_string())
                }
                (_, Some(u), Some(p)) => (u, p),
                // An entry kept for a credential helper or an identity token.
                _ => continue,
            };
            auths.insert(normalize(&key), pair);
        }
        Ok(DockerCredentials { auths })
    }

    /// The credentials for `registry`, anonymous when there are none.
    pub fn for_registry(&self, registry: &str) -> RegistryAuth {
        match self.auths.get(&normalize(registry)) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inline_credentials() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}},
                "127.0.0.1:5000":{{"username":"bob","password":"pw"}},
                "helper.io":{{}}}},"credsStore":"desktop"}}"#
        );
        let c = DockerCredentials::parse(Path::new("c.json"), json.as_bytes()).unwrap();
        assert_eq!(
            c.for_registry("docker.io"),
            RegistryAuth::Basic("alice".into(), "s3:cret".into())
        );
        assert_eq!(
            c.for_registry("127.0.0.1:5000"),
            RegistryAuth::Basic("bob".into(), "pw".into())
        );
        assert_eq!(c.for_registry("helper.io"), RegistryAuth::Anonymous);
        assert_eq!(c.for_registry("other:1"), RegistryAuth::Anonymous);
    }

    #[test]
    fn malformed_config_is_named() {
        let err = DockerCredentials::parse(
            Path::new("/x/config.json"),
            br#"{"auths":{"a":{"auth":"%%%"}}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("/x/config.json") && err.to_string().contains("base64"),
            "{err}"
        );
        assert!(DockerCredentials::parse(Path::new("c"), b"[").is_err());
        assert!(
            DockerCredentials::load(Path::new("/nonexistent/config.json"))
                .unwrap()
                .auths
                .is_empty()
        );
    }
}
