//! File transfers on their own agent connection: uploads stream the source
//! one [`DATA_CHUNK`] at a time, downloads are a [`FileStream`] of chunks.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::StreamExt;
use smol_protocol::{asyncio, AgentError, FrameKind, Request, Response, DATA_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{answer_timeout, parse, unexpected, within, AgentLink};
use crate::error::{Error, Result};
use crate::files::FileStream;

/// How long to wait for the agent's explanation after it closed an upload.
const ERROR_WAIT: Duration = Duration::from_secs(5);

/// Streams `src` to `path` in the guest; returns the size written.
pub(crate) async fn upload<R>(
    link: &impl AgentLink,
    path: &str,
    mode: Option<u32>,
    mut src: R,
) -> Result<u64>
where
    R: AsyncRead + Unpin + Send,
{
    let mut conn = link
        .request(&Request::WriteFile {
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
            send_frame(&mut wr, FrameKind::Data, &buf[..n], &machine, path).await?;
            total += n as u64;
        }
        send_frame(&mut wr, FrameKind::Eof, &[], &machine, path).await?;
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
                let what = || format!("write_file of {path} on machine {machine:?} (the agent did not confirm it)");
                let size = within(answer_timeout(), what, answer).await?;
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

/// One frame of an upload; a guest that takes none of it within
/// [`ANSWER_TIMEOUT`] is a timeout.
async fn send_frame(
    wr: &mut tokio::net::unix::WriteHalf<'_>,
    kind: FrameKind,
    payload: &[u8],
    machine: &str,
    path: &str,
) -> Result<()> {
    let sent = async {
        asyncio::write_frame(wr, kind, payload)
            .await
            .map_err(|e| Error::from_protocol(e, machine))
    };
    let what = || format!("write_file of {path} on machine {machine:?} (the guest took no data)");
    within(answer_timeout(), what, sent).await
}

/// [`upload`], a broken connection explained by the machine's state.
pub(crate) async fn write_file<R>(
    link: &impl AgentLink,
    path: &str,
    mode: Option<u32>,
    src: R,
) -> Result<u64>
where
    R: AsyncRead + Unpin + Send,
{
    match upload(link, path, mode, src).await {
        Ok(n) => Ok(n),
        Err(e) => Err(link.explain(e).await),
    }
}

/// [`download`], a broken connection explained by the machine's state.
pub(crate) async fn read_file_stream(link: &impl AgentLink, path: &str) -> Result<FileStream> {
    match download(link, path).await {
        Ok(s) => Ok(s),
        Err(e) => Err(link.explain(e).await),
    }
}

/// The whole file at `path`.
pub(crate) async fn read_file(link: &impl AgentLink, path: &str) -> Result<Bytes> {
    let s = read_file_stream(link, path).await?;
    match s.bytes().await {
        Ok(b) => Ok(b),
        Err(e) => Err(link.explain(e).await),
    }
}

/// Sends `ReadFile` and waits for `FileInfo` (a missing file fails here).
pub(crate) async fn download(link: &impl AgentLink, path: &str) -> Result<FileStream> {
    let mut conn = link
        .request(&Request::ReadFile {
            path: path.to_string(),
        })
        .await?;
    let (size, mode) = match conn
        .response_within(Some(path), &format!("read_file of {path}"))
        .await?
    {
        Response::FileInfo { size, mode } => (size, mode),
        other => return Err(unexpected("read_file", &other)),
    };
    let path = path.to_string();
    let step = format!("reading {path}");
    let inner = async_stream::stream! {
        loop {
            let f = match conn.next_within(&step).await {
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
    Ok(FileStream::new(size, mode, inner.boxed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uploads and downloads against the agent's real file handlers on the
    /// host (a temp directory stands for the guest filesystem).
    #[tokio::test]
    async fn round_trips_and_errors_against_the_agent() {
        use crate::agent::loopback;
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let root = t.path().join("guest");
        std::fs::create_dir(&root).unwrap();
        let p = |name: &str| root.join(name).to_str().unwrap().to_string();

        for size in [0usize, 1, DATA_CHUNK - 1, DATA_CHUNK, 3 * DATA_CHUNK + 17] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let path = p(&format!("f{size}"));
            let n = upload(&link, &path, Some(0o640), &data[..]).await.unwrap();
            assert_eq!(n, size as u64);
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o640);
            let s = download(&link, &path).await.unwrap();
            assert_eq!((s.size(), s.mode() & 0o7777), (size as u64, 0o640));
            assert_eq!(&s.bytes().await.unwrap()[..], &data[..], "size {size}");
        }

        let missing = p("no/such/file");
        let e = upload(&link, &missing, None, &b"x"[..]).await.unwrap_err();
        assert!(
            matches!(&e, Error::FileNotFound { path } if *path == missing),
            "{e}"
        );
        // A large upload refused up front still reports the agent's reason.
        let big = vec![0u8; 4 << 20];
        let e = upload(&link, &missing, None, &big[..]).await.unwrap_err();
        assert!(matches!(&e, Error::FileNotFound { .. }), "{e}");
        let dir = root.to_str().unwrap().to_string();
        let e = upload(&link, &dir, None, &b"x"[..]).await.unwrap_err();
        assert!(
            matches!(&e, Error::IsADirectory { path } if *path == dir),
            "{e}"
        );
        let e = download(&link, &missing).await.unwrap_err();
        assert!(matches!(&e, Error::FileNotFound { .. }), "{e}");
        let e = download(&link, &dir).await.unwrap_err();
        assert!(matches!(&e, Error::IsADirectory { .. }), "{e}");
        // Nothing half-written was left next to the targets.
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with('f')), "{names:?}");
    }
}
