//! Moving files in and out of the guest in chunks, so that memory stays
//! bounded whatever the file size: uploads read the source one
//! [`DATA_CHUNK`] at a time, downloads are a [`Stream`] of chunks.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::io::{AsyncRead, ReadBuf};

use crate::error::{Error, Result};

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

/// The most [`FileStream::bytes`] collects of a file whose size is not
/// known up front (procfs and sysfs files say 0): 64 MiB.
pub const MAX_UNSIZED_READ: u64 = 64 << 20;

/// A guest file being read: a `Stream` of chunks (at most 64 KiB each).
/// [`FileStream::into_reader`] turns it into a tokio `AsyncRead`.
///
/// The size is the agent's word, and held to it: past a non-zero size the
/// stream ends with an error (a file that grows while it is read is cut at
/// its size by the agent). Size 0 means unknown (procfs).
pub struct FileStream {
    size: u64,
    mode: u32,
    inner: BoxStream<'static, Result<Bytes>>,
}

impl FileStream {
    /// A file's chunks from whichever engine reads it.
    pub(crate) fn new(size: u64, mode: u32, inner: BoxStream<'static, Result<Bytes>>) -> Self {
        let inner = if size == 0 {
            inner
        } else {
            held_to(size, inner)
        };
        FileStream { size, mode, inner }
    }

    /// The file's size when the agent opened it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's permission bits.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// All of it in memory: at most its size, or [`MAX_UNSIZED_READ`]
    /// when the size is not known.
    pub async fn bytes(mut self) -> Result<Bytes> {
        // The size is the agent's word: cap the up-front reservation.
        let mut out = Vec::with_capacity(self.size.min(64 << 20) as usize);
        while let Some(chunk) = self.inner.next().await {
            out.extend_from_slice(&chunk?);
            if self.size == 0 && out.len() as u64 > MAX_UNSIZED_READ {
                return Err(Error::Protocol(format!(
                    "a file of unknown size passed {MAX_UNSIZED_READ} bytes; read it with read_file_stream"
                )));
            }
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

/// `inner`, ended with an error once it has yielded more than `size` bytes.
fn held_to(
    size: u64,
    mut inner: BoxStream<'static, Result<Bytes>>,
) -> BoxStream<'static, Result<Bytes>> {
    async_stream::stream! {
        let mut seen = 0u64;
        while let Some(chunk) = inner.next().await {
            if let Ok(c) = &chunk {
                seen = seen.saturating_add(c.len() as u64);
                if seen > size {
                    yield Err(Error::Protocol(format!(
                        "the agent sent more than the {size} bytes it announced for the file"
                    )));
                    break;
                }
            }
            yield chunk;
        }
    }
    .boxed()
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
    use tokio::io::AsyncReadExt;

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

    /// Issue 15: an agent that sends more than it announced is cut off.
    #[tokio::test]
    async fn a_stream_is_held_to_its_announced_size() {
        let chunks = |n: usize| {
            futures::stream::iter((0..n).map(|_| Ok(Bytes::from_static(b"0123456789")))).boxed()
        };
        let b = FileStream::new(30, 0o644, chunks(3)).bytes().await.unwrap();
        assert_eq!(b.len(), 30);
        let e = FileStream::new(25, 0o644, chunks(1_000_000))
            .bytes()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more than the 25 bytes"), "{e}");
        // Unknown size (procfs): streamed as it comes, collected up to a cap.
        let b = FileStream::new(0, 0o444, chunks(5)).bytes().await.unwrap();
        assert_eq!(b.len(), 50);
        let endless = futures::stream::repeat_with(|| Ok(Bytes::from(vec![0u8; 1 << 20])));
        let e = FileStream::new(0, 0o444, endless.boxed())
            .bytes()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unknown size"), "{e}");
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
