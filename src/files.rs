//! Moving files in and out of the guest in chunks, so that memory stays
//! bounded whatever the file size: uploads read the source one
//! [`DATA_CHUNK`] at a time, downloads are a [`Stream`] of chunks.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::stream::{BoxStream, Stream, StreamExt};
use smol_protocol::{asyncio, AgentError, FrameKind, Request, Response, DATA_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::agent_conn::{parse, unexpected, AgentConnection};
use crate::error::{Error, Result};

/// How long to wait for the agent's explanation after it closed an upload.
const ERROR_WAIT: Duration = Duration::from_secs(5);

/// Guest paths are absolute and NUL-free.
pub(crate) fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument {
            what: "path",
            reason: format!("{path:?} is not absolute"),
        });
    }
    if path.contains('\0') {
        return Err(Error::InvalidArgument {
            what: "path",
            reason: format!("{path:?} contains a NUL byte"),
        });
    }
    Ok(())
}

pub(crate) fn check_mode(mode: Option<u32>) -> Result<()> {
    match mode {
        Some(m) if m > 0o7777 => Err(Error::InvalidArgument {
            what: "mode",
            reason: format!("{m:#o} has bits above 0o7777"),
        }),
        _ => Ok(()),
    }
}

/// Streams `src` to `path` in the guest; returns the size written.
pub(crate) async fn upload<R>(
    mut conn: AgentConnection,
    path: &str,
    mode: Option<u32>,
    mut src: R,
) -> Result<u64>
where
    R: AsyncRead + Unpin + Send,
{
    conn.send(&Request::WriteFile {
        path: path.to_string(),
        mode,
    })
    .await?;
    let machine = conn.machine().to_string();
    let (mut rd, mut wr) = conn.split();
    let send = async {
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut total = 0u64;
        loop {
            let n = src
                .read(&mut buf)
                .await
                .map_err(|e| Error::io(format!("reading the data for {path}"), e))?;
            if n == 0 {
                break;
            }
            asyncio::write_frame(&mut wr, FrameKind::Data, &buf[..n])
                .await
                .map_err(|e| Error::from_protocol(e, &machine))?;
            total += n as u64;
        }
        asyncio::write_frame(&mut wr, FrameKind::Eof, &[])
            .await
            .map_err(|e| Error::from_protocol(e, &machine))?;
        Ok::<u64, Error>(total)
    };
    let answer = async {
        let f = match asyncio::read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(Error::Protocol(format!(
                    "the agent of machine {machine:?} closed the connection before answering"
                )))
            }
            Err(e) => return Err(Error::from_protocol(e, &machine)),
        };
        match f.kind {
            FrameKind::Response => match parse::<Response>(&f, "response")? {
                Response::Written { size } => Ok(size),
                other => Err(unexpected("write_file", &other)),
            },
            FrameKind::Error => Err(Error::from_agent(
                parse::<AgentError>(&f, "error")?,
                Some(path),
            )),
            other => Err(Error::Protocol(format!(
                "expected a response frame, got {other:?}"
            ))),
        }
    };
    tokio::pin!(send, answer);
    tokio::select! {
        biased;
        // The agent answers before the Eof only to refuse.
        early = &mut answer => match early {
            Ok(size) => Err(Error::Protocol(format!("the agent reported {size} bytes written before the upload ended"))),
            Err(e) => Err(e),
        },
        sent = &mut send => match sent {
            Ok(total) => {
                let size = answer.await?;
                if size != total {
                    return Err(Error::Protocol(format!("sent {total} bytes, the agent wrote {size}")));
                }
                Ok(size)
            }
            // A refused upload shows up as a broken pipe; the reason is in
            // the agent's error frame, if it sent one.
            Err(send_err) => match tokio::time::timeout(ERROR_WAIT, answer).await {
                Ok(Err(agent_err @ (Error::FileNotFound { .. }
                | Error::IsADirectory { .. }
                | Error::NotADirectory { .. }
                | Error::PermissionDenied { .. }
                | Error::NoSpace { .. }
                | Error::Guest { .. }))) => Err(agent_err),
                _ => Err(send_err),
            },
        },
    }
}

/// Sends `ReadFile` and waits for `FileInfo` (a missing file fails here).
pub(crate) async fn download(mut conn: AgentConnection, path: &str) -> Result<FileStream> {
    conn.send(&Request::ReadFile {
        path: path.to_string(),
    })
    .await?;
    let (size, mode) = match conn.response(Some(path)).await? {
        Response::FileInfo { size, mode } => (size, mode),
        other => return Err(unexpected("read_file", &other)),
    };
    let path = path.to_string();
    let inner = async_stream::stream! {
        loop {
            let f = match conn.next().await {
                Ok(f) => f,
                Err(e) => { yield Err(e); break; }
            };
            match f.kind {
                FrameKind::Data => yield Ok(Bytes::from(f.payload)),
                FrameKind::Eof => break,
                FrameKind::Error => {
                    yield match parse::<AgentError>(&f, "error") {
                        Ok(e) => Err(Error::from_agent(e, Some(&path))),
                        Err(e) => Err(e),
                    };
                    break;
                }
                other => {
                    yield Err(Error::Protocol(format!("unexpected {other:?} frame during read_file")));
                    break;
                }
            }
        }
    };
    Ok(FileStream {
        size,
        mode,
        inner: inner.boxed(),
    })
}

/// A guest file being read: a `Stream` of chunks (at most 64 KiB each).
/// [`FileStream::into_reader`] turns it into a tokio `AsyncRead`.
pub struct FileStream {
    size: u64,
    mode: u32,
    inner: BoxStream<'static, Result<Bytes>>,
}

impl FileStream {
    /// The file's size when the agent opened it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's permission bits.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// All of it in memory.
    pub async fn bytes(mut self) -> Result<Bytes> {
        // The size is the agent's word: cap the up-front reservation.
        let mut out = Vec::with_capacity(self.size.min(64 << 20) as usize);
        while let Some(chunk) = self.inner.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(Bytes::from(out))
    }

    pub fn into_reader(self) -> FileReader {
        FileReader {
            stream: self,
            chunk: Bytes::new(),
        }
    }
}

impl Stream for FileStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for FileStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStream")
            .field("size", &self.size)
            .field("mode", &format_args!("{:#o}", self.mode))
            .finish_non_exhaustive()
    }
}

/// `AsyncRead` over a [`FileStream`]; errors surface as `io::Error`
/// wrapping the [`Error`].
pub struct FileReader {
    stream: FileStream,
    chunk: Bytes,
}

impl AsyncRead for FileReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.chunk.is_empty() {
            match ready!(Pin::new(&mut self.stream).poll_next(cx)) {
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_modes() {
        check_path("/a b/c").unwrap();
        assert!(matches!(
            check_path("rel"),
            Err(Error::InvalidArgument { what: "path", .. })
        ));
        assert!(matches!(
            check_path("/a\0"),
            Err(Error::InvalidArgument { what: "path", .. })
        ));
        check_mode(Some(0o4755)).unwrap();
        check_mode(None).unwrap();
        assert!(check_mode(Some(0o10000)).is_err());
    }

    /// Uploads and downloads against the agent's real file handlers on the
    /// host (a temp directory stands for the guest filesystem).
    #[tokio::test]
    async fn round_trips_and_errors_against_the_agent() {
        use crate::agent_conn::{loopback, AgentConnection};
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let sock = loopback::agent_socket(t.path());
        let conn = || AgentConnection::open(&sock, "m");
        let root = t.path().join("guest");
        std::fs::create_dir(&root).unwrap();
        let p = |name: &str| root.join(name).to_str().unwrap().to_string();

        for size in [0usize, 1, DATA_CHUNK - 1, DATA_CHUNK, 3 * DATA_CHUNK + 17] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let path = p(&format!("f{size}"));
            let n = upload(conn().await.unwrap(), &path, Some(0o640), &data[..])
                .await
                .unwrap();
            assert_eq!(n, size as u64);
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o640);
            let s = download(conn().await.unwrap(), &path).await.unwrap();
            assert_eq!((s.size(), s.mode() & 0o7777), (size as u64, 0o640));
            assert_eq!(&s.bytes().await.unwrap()[..], &data[..], "size {size}");
        }

        let missing = p("no/such/file");
        let e = upload(conn().await.unwrap(), &missing, None, &b"x"[..])
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::FileNotFound { path } if *path == missing),
            "{e}"
        );
        // A large upload refused up front still reports the agent's reason.
        let big = vec![0u8; 4 << 20];
        let e = upload(conn().await.unwrap(), &missing, None, &big[..])
            .await
            .unwrap_err();
        assert!(matches!(&e, Error::FileNotFound { .. }), "{e}");
        let dir = root.to_str().unwrap().to_string();
        let e = upload(conn().await.unwrap(), &dir, None, &b"x"[..])
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::IsADirectory { path } if *path == dir),
            "{e}"
        );
        let e = download(conn().await.unwrap(), &missing).await.unwrap_err();
        assert!(matches!(&e, Error::FileNotFound { .. }), "{e}");
        let e = download(conn().await.unwrap(), &dir).await.unwrap_err();
        assert!(matches!(&e, Error::IsADirectory { .. }), "{e}");
        // Nothing half-written was left next to the targets.
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with('f')), "{names:?}");
    }

    #[tokio::test]
    async fn reader_over_chunks() {
        let chunks: Vec<Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::new()),
            Ok(Bytes::from_static(b"world")),
        ];
        let fs = FileStream {
            size: 11,
            mode: 0o644,
            inner: futures::stream::iter(chunks).boxed(),
        };
        let mut out = String::new();
        fs.into_reader().read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
        let chunks: Vec<Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"x")),
            Err(Error::FileNotFound { path: "/p".into() }),
        ];
        let fs = FileStream {
            size: 1,
            mode: 0,
            inner: futures::stream::iter(chunks).boxed(),
        };
        let e = fs
            .into_reader()
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/p"), "{e}");
    }
}
