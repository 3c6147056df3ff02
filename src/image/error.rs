//! The errors of the image module.

use std::io;
use std::path::PathBuf;

/// What can go wrong resolving, pulling or importing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
    #[error("image {reference} not found")]
    NotFound { reference: String },
    #[error("tag {tag:?} of {repository} not found")]
    TagNotFound { repository: String, tag: String },
    #[error("image {reference} has no linux/amd64 variant (found: {found})")]
    NoPlatform { reference: String, found: String },
    #[error("registry {registry} refused access to {reference}")]
    Unauthorized { registry: String, reference: String },
    #[error("registry {registry} answered {status}: {body}")]
    Registry {
        registry: String,
        status: u16,
        body: String,
    },
    #[error("cannot reach registry {registry}: {reason}")]
    Network { registry: String, reason: String },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("blob {digest} is larger than the {expected} bytes its descriptor announces")]
    SizeMismatch { digest: String, expected: u64 },
    #[error("malformed {what}: {reason}")]
    BadManifest { what: &'static str, reason: String },
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        what: &'static str,
        media_type: String,
    },
    #[error("layer {digest} is not a tar archive: {reason}")]
    NotATar { digest: String, reason: String },
    #[error("{path}: {reason}")]
    LocalSource { path: PathBuf, reason: String },
    #[error("credentials in {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("no space left on the device storing {what}")]
    NoSpace { what: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// An I/O error on `path`, turned into `NoSpace` when the disk is full.
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return ImageError::NoSpace {
                what: path.display().to_string(),
            };
        }
        ImageError::Io { what, path, source }
    }
}
