//! The image requests of the agent protocol: `PutLayer` (a layer blob
//! streamed in Data frames, unpacked as it arrives), `MissingLayers`,
//! `RecordImage` and `ListImages`, served against the machine's store.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::OnceLock;

use super::{ImageError, ImageRecord, ImageStore};
use crate::protocol::{read_frame, AgentError, ErrorKind, FrameKind, Response};
use crate::server::{send_error, send_response, Duplex, ServeError};

/// Where the machine disk is mounted once the root is switched.
pub const DISK_MOUNT: &str = "/run/smol/disk";
/// The store on a machine without a disk (tmpfs).
pub const MEMORY_STORE: &str = "/run/smol/images";

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(path)))
        .unwrap_or(false)
}

/// The store root: on the machine disk (outside the root overlay, so an
/// overlay can be stacked on its layers), else in memory.
/// `SMOL_AGENT_IMAGE_STORE` overrides it (host tests).
pub fn store_root() -> PathBuf {
    if let Some(p) = std::env::var_os("SMOL_AGENT_IMAGE_STORE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if is_mountpoint(DISK_MOUNT) {
        PathBuf::from(DISK_MOUNT).join("images")
    } else {
        PathBuf::from(MEMORY_STORE)
    }
}

/// The machine's image store, opened on first use.
pub fn store() -> Result<&'static ImageStore, AgentError> {
    static STORE: OnceLock<ImageStore> = OnceLock::new();
    if let Some(s) = STORE.get() {
        return Ok(s);
    }
    let opened = ImageStore::open(store_root()).map_err(agent_error)?;
    Ok(STORE.get_or_init(|| opened))
}

/// Maps store errors to protocol errors; the host recognises the messages
/// of `NotATar` and `DigestMismatch` by their prefixes.
pub fn agent_error(e: ImageError) -> AgentError {
    let kind = match &e {
        ImageError::NoSpace(_) => ErrorKind::NoSpace,
        ImageError::ImageNotFound(_) | ImageError::LayerMissing(_) => ErrorKind::NotFound,
        ImageError::Unsupported(_) => ErrorKind::Unsupported,
        ImageError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            ErrorKind::PermissionDenied
        }
        ImageError::Io { .. } | ImageError::BadRecord { .. } => ErrorKind::Io,
        _ => ErrorKind::InvalidArgument,
    };
    AgentError::new(kind, crate::server::error_chain(&e))
}

/// Reads the payloads of Data frames up to an Eof frame.
struct DataFrames<'a, S> {
    conn: &'a mut S,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<S: Read> Read for DataFrames<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match read_frame(self.conn).map_err(io::Error::other)? {
                Some(f) if f.kind == FrameKind::Data => {
                    self.buf = f.payload;
                    self.pos = 0;
                }
                Some(f) if f.kind == FrameKind::Eof => self.done = true,
                Some(f) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected {:?} frame in a layer", f.kind),
                    ))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the host closed before Eof",
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `PutLayer`: Data frames and an Eof follow the request; the answer is
/// `LayerStored` once the layer is verified and unpacked.
pub fn put_layer<S: Duplex>(s: &mut S, digest: &str, _size: u64) -> Result<(), ServeError> {
    let store = match store() {
        Ok(st) => st,
        Err(e) => return Ok(send_error(s, &e)?),
    };
    let mut frames = DataFrames {
        conn: s,
        buf: Vec::new(),
        pos: 0,
        done: false,
    };
    let result = store.put_layer(digest, &mut frames);
    // Whatever happened, consume the rest so the host sees our answer.
    let _ = io::copy(&mut frames, &mut io::sink());
    match result {
        Ok(stats) => send_response(
            s,
            &Response::LayerStored {
                digest: digest.to_string(),
                size: stats.size,
                cached: stats.cached,
            },
        )?,
        Err(e) => send_error(s, &agent_error(e))?,
    }
    Ok(())
}

pub fn missing_layers<S: Duplex>(s: &mut S, digests: &[String]) -> Result<(), ServeError> {
    match store().and_then(|st| st.missing_layers(digests).map_err(agent_error)) {
        Ok(missing) => send_response(s, &Response::MissingLayers { digests: missing })?,
        Err(e) => send_error(s, &e)?,
    }
    Ok(())
}

pub fn record_image<S: Duplex>(s: &mut S, record: &ImageRecord) -> Result<(), ServeError> {
    match store().and_then(|st| st.record(record).map_err(agent_error)) {
        Ok(merged) => send_response(s, &Response::Image(merged))?,
        Err(e) => send_error(s, &e)?,
    }
    Ok(())
}

pub fn list_images<S: Duplex>(s: &mut S) -> Result<(), ServeError> {
    match store().and_then(|st| st.list().map_err(agent_error)) {
        Ok(images) => send_response(s, &Response::Images { images })?,
        Err(e) => send_error(s, &e)?,
    }
    Ok(())
}
