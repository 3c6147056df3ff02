//! The host/guest protocol spoken over one vsock stream per request.
//!
//! The host reaches the agent on vsock port [`AGENT_PORT`] (through the
//! monitor's Unix socket: `CONNECT 1024\n` / `OK <port>\n`). Every byte after
//! that is a sequence of frames:
//!
//! ```text
//! +---------+----------------+------------------+
//! | kind u8 | length u32 LE  | payload (length) |
//! +---------+----------------+------------------+
//! ```
//!
//! Control frames ([`FrameKind::Request`], [`FrameKind::Response`],
//! [`FrameKind::Exit`], [`FrameKind::Error`]) carry JSON; data frames
//! ([`FrameKind::Stdout`], [`FrameKind::Stderr`], [`FrameKind::Stdin`],
//! [`FrameKind::Data`]) carry raw bytes; [`FrameKind::Eof`] is empty.
//!
//! One connection carries one request:
//! - `Hello`: the agent answers `Response::Hello`. With `facts` (sent after
//!   every boot and restore: fresh entropy, the host's clock, the hostname)
//!   it applies them first, or answers `Error`.
//! - `Exec`: the agent answers `Response::Started` (or `Error`), then Stdout
//!   and Stderr frames as output is produced, then one `Exit` (or `Error`).
//!   With `stdin: true` the host may send Stdin frames and an `Eof`.
//! - `WriteFile`: the host sends Data frames and an `Eof`; the agent answers
//!   `Response::Written` (or `Error`). The file appears atomically.
//! - `ReadFile`: the agent answers `Response::FileInfo`, then Data frames and
//!   an `Eof` (or `Error` at any point).
//! - `Shutdown`: the agent answers `Response::Ok` and powers the guest off.
//! - `PutLayer`: the host sends the layer blob in Data frames and an `Eof`;
//!   the agent verifies its digest while unpacking it into the machine's
//!   image store and answers `Response::LayerStored` (or `Error`).
//! - `MissingLayers`: answered by `Response::MissingLayers`.
//! - `RecordImage`: records an image whose layers are all stored; answered
//!   by `Response::Image` (the record as kept). `ListImages`: answered by
//!   `Response::Images`.
//! - An `Exec` with a `container` runs in a container of that image (see
//!   (the agent's `image::container`); everything else is as for any exec.
//! - `Connect`: the agent connects to the guest's TCP port on its loopback
//!   and answers `Response::Connected` (or `Error`, kind `ConnectionRefused`
//!   when nothing listens there). After that answer the connection carries
//!   no more frames: it is a raw byte stream to the guest port in both
//!   directions, and a half-close (vsock shutdown) in either direction is
//!   passed on as a half-close of the TCP connection (port forwarding).
//! - `ConfigureNetwork`: the agent configures the network device by DHCP
//!   and answers `Response::Network` (or `Error`).
//! - `Mount`: the agent mounts each virtio-fs share (by its tag) at its
//!   target, creating the target directory, and answers `Response::Ok` (or
//!   `Error`); a share mounted there already is left as it is. `Unmount`:
//!   the agent unmounts the shares at those targets (one not mounted is
//!   skipped) and answers `Response::Ok`, or `Error` of kind `InUse` when a
//!   guest process still uses one. The host unmounts every share before a
//!   snapshot (FUSE state does not survive one) and mounts them again after.
//!
//! - `Signal`: the agent sends the signal to one of the commands it runs
//!   (by the pid `Started` gave) and answers `Response::Ok`, or `Error` of
//!   kind `NotFound` when none of them has that pid (it ended), or
//!   `InvalidArgument` for a number that is no signal. It travels on a
//!   connection of its own, so a command whose stdin is full still gets it.
//! - `Resize`: the same for the terminal size of a command run with `tty`
//!   (`InvalidArgument` for one without, or a size of zero).
//! - `Detach`: the same, and from then on the command outlives its exec
//!   connection: when the host closes that, the agent closes the
//!   command's stdin and discards its output instead of killing it (its
//!   timeout still holds).
//!
//! The crate is shared by the SDK and the guest agent (serde types and
//! framing only), so the SDK never compiles the agent.
//!
//! Both sides treat the peer's bytes as untrusted: unknown kinds, oversized
//! frames and bad JSON are errors, never panics.

pub mod image;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest payload either side accepts in one frame.
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// Size in which data (output, file contents) is cut into frames: several
/// vsock packets (64 KiB at most) per frame, so that moving a frame costs
/// the guest one system call, not one per packet (each costs ~0.4 ms in a
/// guest on a kvm_pvm host).
pub const DATA_CHUNK: usize = 256 * 1024;
/// Header length: kind (1) + length (4).
pub const HEADER_LEN: usize = 5;

/// The line the agent writes to the console once it serves requests.
pub const READY_LINE: &str = "smol-agent: ready";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
    Stdout = 3,
    Stderr = 4,
    Stdin = 5,
    Data = 6,
    Eof = 7,
    Exit = 8,
    Error = 9,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Stdout,
            4 => FrameKind::Stderr,
            5 => FrameKind::Stdin,
            6 => FrameKind::Data,
            7 => FrameKind::Eof,
            8 => FrameKind::Exit,
            9 => FrameKind::Error,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(u32),
    #[error("malformed {what} message")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: FrameKind, got: FrameKind },
    #[error("connection closed mid-frame")]
    Truncated,
    #[error("i/o on the agent connection")]
    Io(#[from] io::Error),
}

/// One frame: a kind and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: Vec<u8>) -> Self {
        Frame { kind, payload }
    }

    /// A control frame with a JSON payload.
    pub fn json<T: Serialize>(kind: FrameKind, msg: &T) -> Self {
        // Serializing our own plain data types cannot fail.
        let payload = serde_json::to_vec(msg).expect("protocol types serialize");
        Frame { kind, payload }
    }

    /// Decodes the JSON payload of a control frame.
    pub fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
    ) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtocolError::Json { what, source })
    }

    /// Fails unless the frame is of kind `expected`.
    pub fn expect(self, expected: FrameKind) -> Result<Self, ProtocolError> {
        if self.kind == expected {
            Ok(self)
        } else {
            Err(ProtocolError::Unexpected {
                expected,
                got: self.kind,
            })
        }
    }

    /// Header followed by payload, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&encode_header(self.kind, self.payload.len()));
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Encodes a frame header. `len` must not exceed [`MAX_FRAME_LEN`].
pub fn encode_header(kind: FrameKind, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_FRAME_LEN as usize);
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Parses and checks a frame header.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(FrameKind, u32), ProtocolError> {
    let kind = FrameKind::from_u8(h[0])?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((kind, len))
}

/// Writes one frame (header and payload in one write where possible).
pub fn write_frame<W: Write>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    if payload.len() > MAX_FRAME_LEN as usize {
        return Err(ProtocolError::TooLarge(payload.len() as u32));
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&encode_header(kind, payload.len()));
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the peer closed the stream cleanly
/// between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = decode_header(&h)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated
        } else {
            ProtocolError::Io(e)
        }
    })?;
    Ok(Some(Frame { kind, payload }))
}

/// Async framing for the host side.
#[cfg(feature = "tokio")]
pub mod asyncio {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub async fn write_frame<W: AsyncWrite + Unpin>(
        w: &mut W,
        kind: FrameKind,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        if payload.len() > MAX_FRAME_LEN as usize {
            return Err(ProtocolError::TooLarge(payload.len() as u32));
        }
        // Header and payload go out together (writev), with no copy of
        // the payload into a frame buffer.
        let header = encode_header(kind, payload.len());
        let total = HEADER_LEN + payload.len();
        let mut sent = 0;
        while sent < total {
            let n = if sent < HEADER_LEN {
                let parts = [io::IoSlice::new(&header[sent..]), io::IoSlice::new(payload)];
                w.write_vectored(&parts).await?
            } else {
                w.write(&payload[sent - HEADER_LEN..]).await?
            };
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            sent += n;
        }
        Ok(())
    }

    pub async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Option<Frame>, ProtocolError> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut h[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(ProtocolError::Truncated),
                n => got += n,
            }
        }
        let (kind, len) = decode_header(&h)?;
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Truncated
            } else {
                ProtocolError::Io(e)
            }
        })?;
        Ok(Some(Frame { kind, payload }))
    }
}

/// A request: the first frame the host sends on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello {
        version: u32,
        #[serde(default)]
        facts: Option<MachineFacts>,
    },
    Exec(ExecRequest),
    WriteFile {
        path: String,
        mode: Option<u32>,
    },
    ReadFile {
        path: String,
    },
    Shutdown,
    PutLayer {
        digest: String,
        size: u64,
    },
    MissingLayers {
        digests: Vec<String>,
    },
    RecordImage(crate::image::ImageRecord),
    ListImages,
    /// Relay this connection to the guest's TCP port `port` on loopback.
    Connect {
        port: u16,
    },
    /// Configure the network device by DHCP (after every boot and
    /// restore of a machine with `resources.network`).
    ConfigureNetwork,
    /// Mount the machine's virtio-fs shares (after every boot and restore,
    /// and after a snapshot).
    Mount {
        mounts: Vec<ShareMount>,
    },
    /// Unmount the shares at these targets (before a snapshot).
    Unmount {
        targets: Vec<String>,
    },
    /// Send `signal` to the running command `pid` (an exec's `Started`).
    Signal {
        pid: u32,
        signal: i32,
    },
    /// Resize the terminal of the running command `pid` (run with `tty`).
    Resize {
        pid: u32,
        size: TtySize,
    },
    /// Let the running command `pid` outlive its exec connection.
    Detach {
        pid: u32,
    },
}

/// A virtio-fs share as the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    /// The device's mount tag (see [`check_share_tag`]).
    pub tag: String,
    /// Where it is mounted (see [`check_mount_target`]).
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Most shares a machine has (each is a device and a virtiofsd).
pub const MAX_SHARES: usize = 8;
/// Longest virtio-fs mount tag (the device's config field).
pub const MAX_TAG_LEN: usize = 36;
/// Longest mount target, in bytes (Linux's `PATH_MAX` less its NUL).
pub const MAX_TARGET_LEN: usize = 4095;

/// Guest directories a share may not be mounted on: the root, the API
/// file systems and the agent's runtime directories. Nothing may be
/// mounted under those marked `true` either.
pub const RESERVED_TARGETS: &[(&str, bool)] = &[
    ("/", false),
    ("/proc", true),
    ("/sys", true),
    ("/dev", true),
    ("/run", false),
    ("/tmp", false),
    // The agent's own: the machine disk, the image store, the lease.
    ("/run/smol", true),
];

/// Why `target` cannot be a mount target: it must be absolute and
/// normalised (no `.`, `..` or empty components, no trailing `/`), free
/// of NUL, and not [`RESERVED_TARGETS`]. Both the SDK and the agent check.
pub fn check_mount_target(target: &str) -> Result<(), String> {
    if !target.starts_with('/') {
        return Err(format!("{target:?} is not an absolute path"));
    }
    if target.len() > MAX_TARGET_LEN {
        return Err(format!(
            "a target of {} bytes is longer than {MAX_TARGET_LEN}",
            target.len()
        ));
    }
    if target.contains('\0') {
        return Err(format!("{target:?} contains a NUL byte"));
    }
    if target != "/" {
        for c in target[1..].split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(format!(
                    "{target:?} is not normalised (an empty, \".\" or \"..\" component)"
                ));
            }
        }
    }
    for (reserved, below) in RESERVED_TARGETS {
        if target == *reserved {
            return Err(format!("{target:?} is reserved for the system"));
        }
        if *below
            && target
                .strip_prefix(reserved)
                .is_some_and(|r| r.starts_with('/'))
        {
            return Err(format!(
                "{target:?} is under {reserved}, which is reserved for the system"
            ));
        }
    }
    Ok(())
}

/// Why `tag` cannot be a share's tag: 1 to [`MAX_TAG_LEN`] bytes of ASCII
/// letters, digits, `-` and `_`.
pub fn check_share_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{tag:?} is not a share tag (1 to {MAX_TAG_LEN} of A-Z a-z 0-9 - _)"
        ))
    }
}

/// What makes a machine itself rather than a copy of the snapshot it was
/// restored from: sent with the first `Hello` after every boot and restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFacts {
    /// Random bytes from the host, mixed into the guest's entropy pool
    /// before its CRNG is reseeded (at most [`MAX_ENTROPY_LEN`]).
    pub entropy: Vec<u8>,
    /// The host's wall clock, in nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// The machine's name, as its hostname.
    pub hostname: String,
}

/// Most entropy bytes a `Refresh` may carry.
pub const MAX_ENTROPY_LEN: usize = 512;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments, passed to execve untouched (no shell).
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub workdir: Option<String>,
    /// Kill the whole process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Whether the host will send Stdin frames; otherwise stdin is /dev/null.
    pub stdin: bool,
    /// Run in a container of this image instead of on the machine's root.
    #[serde(default)]
    pub container: Option<crate::image::ContainerSpec>,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are
    /// its slave (output comes as Stdout frames only, as a terminal shows
    /// it), `TERM` is set unless `env` sets it, and an `Eof` from the host
    /// is the terminal's end-of-file character.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Answers carried in `Response` frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        agent: String,
    },
    Started {
        pid: u32,
    },
    Written {
        size: u64,
    },
    FileInfo {
        size: u64,
        mode: u32,
    },
    Ok,
    LayerStored {
        digest: String,
        size: u64,
        cached: bool,
    },
    MissingLayers {
        digests: Vec<String>,
    },
    Image(crate::image::ImageRecord),
    Images {
        images: Vec<crate::image::ImageRecord>,
    },
    /// The guest port accepted: raw bytes from here on.
    Connected,
    Network(NetworkInfo),
}

/// The guest's network as DHCP configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub interface: String,
    pub address: String,
    /// Also `host.smol.internal`: the host's loopback through passt.
    pub gateway: String,
    pub dns: Vec<String>,
}

/// How a process ended: carried in the `Exit` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// The agent killed it because the timeout passed.
    pub timed_out: bool,
}

/// An error the agent reports: carried in the `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NoSpace,
    Timeout,
    Unsupported,
    Protocol,
    Io,
    /// Nothing listens on the guest port of a `Connect`.
    ConnectionRefused,
    /// A guest process uses what was to be released (a share to unmount).
    InUse,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

/// `e` and its sources, joined with ": " (what both sides put in an error
/// message, so that the cause deep down is named).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let req = Request::Exec(ExecRequest {
            argv: vec!["echo".into(), "a b 'c'".into()],
            ..Default::default()
        });
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            FrameKind::Request,
            &serde_json::to_vec(&req).unwrap(),
        )
        .unwrap();
        let f = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Request);
        assert_eq!(f.parse::<Request>("request").unwrap(), req);
    }

    /// The async writer sends header and payload in pieces when the
    /// stream takes few bytes at a time, and the frames arrive whole.
    #[cfg(feature = "tokio")]
    #[test]
    fn async_frames_survive_short_writes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(3);
            let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
            let sent = big.clone();
            let writer = async move {
                asyncio::write_frame(&mut a, FrameKind::Data, &sent)
                    .await
                    .unwrap();
                asyncio::write_frame(&mut a, FrameKind::Eof, &[])
                    .await
                    .unwrap();
            };
            let reader = async {
                let f = asyncio::read_frame(&mut b).await.unwrap().unwrap();
                let g = asyncio::read_frame(&mut b).await.unwrap().unwrap();
                (f, g)
            };
            let ((), (f, g)) = tokio::join!(writer, reader);
            assert_eq!((f.kind, f.payload.len()), (FrameKind::Data, big.len()));
            assert_eq!(f.payload, big);
            assert_eq!((g.kind, g.payload.len()), (FrameKind::Eof, 0));
        });
    }

    #[test]
    fn clean_close_and_truncation() {
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
        assert!(matches!(
            read_frame(&mut [3u8, 1].as_slice()),
            Err(ProtocolError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut [3u8, 4, 0, 0, 0, b'a'].as_slice()),
            Err(ProtocolError::Truncated)
        ));
    }

    #[test]
    fn rejects_unknown_kind_and_oversize() {
        assert!(matches!(
            read_frame(&mut [0xee, 0, 0, 0, 0].as_slice()),
            Err(ProtocolError::UnknownKind(0xee))
        ));
        let h = encode_header(FrameKind::Data, 0);
        let mut big = h;
        big[1..].copy_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode_header(&big),
            Err(ProtocolError::TooLarge(_))
        ));
    }

    #[test]
    fn mount_targets() {
        for ok in [
            "/mnt",
            "/data/x",
            "/tmp/share",
            "/run/user",
            "/srv/a b",
            "/home/me/.cache",
        ] {
            check_mount_target(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "mnt",
            "./mnt",
            "/",
            "/proc",
            "/proc/x",
            "/sys",
            "/sys/fs",
            "/dev",
            "/dev/shm",
            "/run",
            "/tmp",
            "/run/smol",
            "/run/smol/disk",
            "/mnt/",
            "//mnt",
            "/mnt//x",
            "/mnt/./x",
            "/mnt/../etc",
            "/..",
            "/a\0b",
        ] {
            assert!(check_mount_target(bad).is_err(), "{bad:?}");
        }
        // Only the exact names, not a prefix of a longer one.
        check_mount_target("/procfs").unwrap();
        check_mount_target("/device").unwrap();
        check_mount_target("/run/smoldir").unwrap();
        assert!(check_mount_target(&format!("/{}", "x".repeat(MAX_TARGET_LEN))).is_err());
    }

    #[test]
    fn share_tags() {
        check_share_tag("smol0").unwrap();
        check_share_tag(&"t".repeat(MAX_TAG_LEN)).unwrap();
        for bad in ["", "a b", "a/b", "é", &"t".repeat(MAX_TAG_LEN + 1)] {
            assert!(check_share_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_requests_round_trip() {
        let req = Request::Mount {
            mounts: vec![ShareMount {
                tag: "smol0".into(),
                target: "/data".into(),
                read_only: true,
            }],
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"op":"mount","mounts":[{"tag":"smol0","target":"/data","read_only":true}]}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let json = serde_json::to_string(&Request::Unmount {
            targets: vec!["/data".into()],
        })
        .unwrap();
        assert_eq!(json, r#"{"op":"unmount","targets":["/data"]}"#);
        let e = AgentError::new(ErrorKind::InUse, "busy");
        assert!(serde_json::to_string(&e).unwrap().contains(r#""in_use""#));
    }

    #[test]
    fn bad_json_is_an_error() {
        let f = Frame::new(FrameKind::Request, b"{not json".to_vec());
        assert!(matches!(
            f.parse::<Request>("request"),
            Err(ProtocolError::Json { .. })
        ));
    }
}
