//! Image references (`busybox`, `registry:5000/team/app:1.0`,
//! `name@sha256:…`) and image sources (a registry reference, an `oci-layout`
//! directory or a `docker save` archive).

use std::fmt;
use std::path::PathBuf;

use super::error::ImageError;
use super::store::Digest;

/// Docker Hub, where a reference without a registry points.
pub const DOCKER_HUB: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed registry reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Host, with the port when one was given (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path, with Docker Hub's implied `library/` for one-part names.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// The manifest digest; it wins over the tag when both are given.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parses a reference the way `docker pull` reads it.
    pub fn parse(reference: &str) -> Result<ImageRef, ImageError> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if reference.is_empty() {
            return Err(bad("empty"));
        }
        if reference.trim() != reference
            || reference
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("contains whitespace"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::parse(d)
                    .map_err(|_| bad("the digest must be sha256:<64 hex digits>"))?;
                (rest, Some(digest))
            }
            None => (reference, None),
        };
        // A tag is after the last ':' that follows the last '/', so that
        // `host:5000/name` keeps its port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|r| bad(&r))?;
        }
        if name.is_empty() {
            return Err(bad("no repository name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("name longer than 255 characters"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if is_registry(first) => (first, path),
            _ => (DOCKER_HUB, name),
        };
        check_registry(registry).map_err(|r| bad(&r))?;
        for component in path.split('/') {
            check_component(component).map_err(|r| bad(&r))?;
        }
        let registry = match registry {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
            r => r,
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(ImageRef {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// Whether this registry is reached over plain HTTP: loopback addresses
    /// always, others when listed in `insecure` (`host:port` entries).
    pub fn is_insecure(&self, insecure: &[String]) -> bool {
        is_loopback(&self.registry) || insecure.iter().any(|r| r == &self.registry)
    }

    /// The reference oci-client works with.
    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(tag), Some(d)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone(),
                d.to_string(),
            ),
            (_, Some(d)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.to_string(),
            ),
            (tag, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_string()),
            ),
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference.
    Registry(ImageRef),
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`);
    /// `tag` picks a manifest by its `org.opencontainers.image.ref.name`.
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// A `docker save` archive; `tag` picks an image by one of its RepoTags.
    DockerArchive { path: PathBuf, tag: Option<String> },
}

impl ImageSource {
    /// Parses `oci-layout:<dir>[:<tag>]`, `docker-archive:<file>[:<repo:tag>]`
    /// or else a registry reference. A bare path (`/…`, `./…`, `../…`) is
    /// refused. With `SMOL_IMAGE_SOURCES=registry` in the environment, the
    /// local forms are refused too: for a service that passes on image
    /// names it does not trust, so that none reads the host's files.
    pub fn parse(source: &str) -> Result<ImageSource, ImageError> {
        Self::parse_with(source, local_sources_allowed())
    }

    /// [`ImageSource::parse`], with local sources allowed or not.
    pub fn parse_with(source: &str, allow_local: bool) -> Result<ImageSource, ImageError> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: source.to_string(),
            reason: reason.to_string(),
        };
        let local = ["oci-layout:", "oci:", "docker-archive:"]
            .iter()
            .any(|p| source.starts_with(p));
        if local && !allow_local {
            return Err(bad(
                "local image sources are turned off (SMOL_IMAGE_SOURCES=registry)",
            ));
        }
        if let Some(rest) = source
            .strip_prefix("oci-layout:")
            .or_else(|| source.strip_prefix("oci:"))
        {
            // The tag follows the last ':' after the last '/'.
            let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
            let (dir, tag) = match rest[last_slash..].rfind(':') {
                Some(i) => (
                    &rest[..last_slash + i],
                    Some(rest[last_slash + i + 1..].to_string()),
                ),
                None => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("no directory"));
            }
            if let Some(t) = &tag {
                if t.is_empty() {
                    return Err(bad("empty tag"));
                }
            }
            return Ok(ImageSource::OciLayout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(rest) = source.strip_prefix("docker-archive:") {
            let (path, tag) = match rest.split_once(':') {
                Some((p, t)) if !t.is_empty() => (p, Some(t.to_string())),
                Some(_) => return Err(bad("empty tag")),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("no archive path"));
            }
            return Ok(ImageSource::DockerArchive {
                path: PathBuf::from(path),
                tag,
            });
        }
        if source.starts_with('/') || source.starts_with("./") || source.starts_with("../") {
            // Only the explicit forms read local files: a name forwarded
            // from elsewhere must not turn into a path by its looks.
            return Err(bad(
                "a path is not an image reference; write oci-layout:<dir> or docker-archive:<file>",
            ));
        }
        ImageRef::parse(source).map(ImageSource::Registry)
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Registry(r) => write!(f, "{r}"),
            ImageSource::OciLayout { dir, tag } => {
                write!(f, "oci-layout:{}", dir.display())?;
                tag.as_ref().map_or(Ok(()), |t| write!(f, ":{t}"))
            }
            ImageSource::DockerArchive { path, tag } => {
                write!(f, "docker-archive:{}", path.display())?;
                tag.as_ref().map_or(Ok(()), |t| write!(f, ":{t}"))
            }
        }
    }
}

/// `SMOL_IMAGE_SOURCES`: `registry` allows registry references only;
/// unset (or `all`), local layouts and archives too.
pub const IMAGE_SOURCES_ENV: &str = "SMOL_IMAGE_SOURCES";

fn local_sources_allowed() -> bool {
    std::env::var(IMAGE_SOURCES_ENV).map_or(true, |v| v != "registry")
}

/// Whether the first path part names a registry rather than a repository.
fn is_registry(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = split_host_port(registry);
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(format!("bad registry port {port:?}"));
        }
    }
    let ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad registry host {host:?}"))
    }
}

fn split_host_port(registry: &str) -> (&str, Option<&str>) {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => match registry[end + 1..].strip_prefix(':') {
                Some(port) => (&registry[..=end], Some(port)),
                None => (registry, None),
            },
            None => (registry, None),
        };
    }
    match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    }
}

/// Loopback registries are reached over plain HTTP, as docker does.
pub fn is_loopback(registry: &str) -> bool {
    let (host, _) = split_host_port(registry);
    if host == "localhost" || host == "[::1]" {
        return true;
    }
    host.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// One path component: lowercase alphanumerics joined by `.`, `_`, `__` or dashes.
fn check_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("empty path component".into());
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("repository name {c:?} must be lowercase"));
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "path component {c:?} must start and end with a letter or digit"
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or a run of '-'.
        let sep_end = match b {
            b'.' => i + 1,
            b'_' if bytes.get(i + 1) == Some(&b'_') => i + 2,
            b'_' => i + 1,
            b'-' => i + bytes[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return Err(format!("invalid character {:?} in {c:?}", b as char)),
        };
        if !bytes.get(sep_end).copied().is_some_and(alnum) {
            return Err(format!("bad separator in {c:?}"));
        }
        i = sep_end;
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    if bytes.is_empty() {
        return Err("empty tag".into());
    }
    if bytes.len() > MAX_TAG_LEN {
        return Err("tag longer than 128 characters".into());
    }
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(format!("invalid tag {tag:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_names_get_library_and_latest() {
        let r = parse("busybox");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(
            parse("python:3.12-alpine").to_string(),
            "docker.io/library/python:3.12-alpine"
        );
        assert_eq!(parse("team/app").repository, "team/app");
        assert_eq!(parse("docker.io/busybox").repository, "library/busybox");
        assert_eq!(
            parse("index.docker.io/library/busybox:1").registry,
            "docker.io"
        );
    }

    #[test]
    fn registries_ports_and_digests() {
        let r = parse("127.0.0.1:5000/smol/busybox:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "smol/busybox");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r = parse("localhost:5000/app");
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("localhost:5000", Some("latest"))
        );
        let r = parse(&format!("ghcr.io/a/b/c@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().to_string(), D);
        assert_eq!(r.to_oci().digest(), Some(D));
        let r = parse(&format!("busybox:1.36@{D}"));
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        assert!(r.digest.is_some());
        assert_eq!(parse("[::1]:5000/x:y").registry, "[::1]:5000");
    }

    #[test]
    fn bad_references_are_named() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "/abs",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "with space",
            "reg.io:99999/x",
            "x/y_-z",
            "a..b",
            "-a",
        ] {
            match ImageRef::parse(bad) {
                Err(ImageError::InvalidReference { reference, .. }) => assert_eq!(reference, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let long = format!("x:{}", "a".repeat(129));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn loopback_and_insecure() {
        assert!(parse("127.0.0.1:5000/a").is_insecure(&[]));
        assert!(parse("127.1.2.3:5000/a").is_insecure(&[]));
        assert!(parse("localhost/a").is_insecure(&[]));
        assert!(parse("[::1]:5000/a").is_insecure(&[]));
        assert!(!parse("10.0.0.1:5000/a").is_insecure(&[]));
        assert!(parse("10.0.0.1:5000/a").is_insecure(&["10.0.0.1:5000".into()]));
        assert!(!parse("busybox").is_insecure(&[]));
    }

    #[test]
    fn sources() {
        assert_eq!(
            ImageSource::parse("oci-layout:/tmp/lay:v1").unwrap(),
            ImageSource::OciLayout {
                dir: "/tmp/lay".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageSource::parse("oci:/tmp/lay").unwrap(),
            ImageSource::OciLayout {
                dir: "/tmp/lay".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageSource::parse("docker-archive:/tmp/a.tar:busybox:1").unwrap(),
            ImageSource::DockerArchive {
                path: "/tmp/a.tar".into(),
                tag: Some("busybox:1".into())
            }
        );
        assert!(matches!(
            ImageSource::parse("busybox").unwrap(),
            ImageSource::Registry(_)
        ));
        let err = ImageSource::parse_with("oci-layout:/tmp/lay:v1", false).unwrap_err();
        assert!(
            err.to_string().contains("SMOL_IMAGE_SOURCES=registry"),
            "{err}"
        );
        assert!(ImageSource::parse_with("docker-archive:/a.tar", false).is_err());
        assert!(ImageSource::parse_with("busybox", false).is_ok());
        // Issue 15: a bare path is not taken for a source, existing or not.
        let dir = tempfile::tempdir().unwrap();
        for p in [
            "/definitely/not/here".to_string(),
            dir.path().display().to_string(),
            "./layout".into(),
            "../archive.tar".into(),
        ] {
            let err = ImageSource::parse(&p).unwrap_err();
            assert!(
                matches!(&err, ImageError::InvalidReference { reason, .. } if reason.contains("oci-layout:<dir>")),
                "{p}: {err}"
            );
        }
    }
}
