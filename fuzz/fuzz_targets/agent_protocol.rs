//! The agent protocol in both directions, over the same bytes.
//!
//! As the agent reads a connection: the first frame must be a Request,
//! parsed and checked as the handlers check it before acting (facts,
//! mount targets and tags, layer digests, which name paths), then the
//! frames that follow it (Data, Stdin, Eof) up to the end.
//!
//! As the SDK reads one: frames (with `asyncio::read_frame`, which the SDK
//! uses, and `read_frame`, which must agree with it), each Response, Error
//! and Exit parsed; data frames are passed on.
//!
//! Every message that parses must serialise and parse back to itself.
//! Errors are expected; a panic is a bug, and so is an allocation past the
//! protocol's limits: no single allocation beyond a frame of
//! `MAX_FRAME_LEN` (or a small multiple of the input, for what JSON
//! decodes into), and no more live at once than two such frames plus that.

#![no_main]

use std::future::Future;
use std::path::{Component, Path};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use smol_agent::image::digest_hex;
use smol_agent::reseed;
use smol_fuzz::Counting;
use smol_protocol::{
    asyncio, check_mount_target, check_share_tag, read_frame, AgentError, ExitStatus, Frame,
    FrameKind, ProtocolError, Request, Response, MAX_ENTROPY_LEN, MAX_FRAME_LEN, MAX_TAG_LEN,
    MAX_TARGET_LEN,
};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let base = Counting::reset();
    agent_side(data);
    host_side(data);
    let frame = MAX_FRAME_LEN as usize;
    let largest = Counting::largest();
    assert!(
        largest <= frame.max(32 * data.len()) + 4096,
        "an allocation of {largest} bytes for {} bytes of input",
        data.len()
    );
    let peak = Counting::peak() - base;
    assert!(
        peak <= 2 * frame + 64 * data.len() + (64 << 10),
        "{peak} bytes live for {} bytes of input",
        data.len()
    );
});

fn agent_side(data: &[u8]) {
    let mut conn = data;
    let Ok(Some(frame)) = read_frame(&mut conn) else {
        return;
    };
    let Ok(frame) = frame.expect(FrameKind::Request) else {
        return;
    };
    if let Ok(req) = frame.parse::<Request>("request") {
        check_request(&req);
        round_trip(&req);
    }
    // What follows the request: Data for files and layers, Stdin for an
    // exec, Eof; anything else ends the request.
    while let Ok(Some(f)) = read_frame(&mut conn) {
        assert!(f.payload.len() <= MAX_FRAME_LEN as usize);
        if !matches!(f.kind, FrameKind::Data | FrameKind::Stdin | FrameKind::Eof) {
            break;
        }
    }
}

/// The handlers' checks, and what their success promises.
fn check_request(req: &Request) {
    match req {
        Request::Hello {
            facts: Some(facts), ..
        } if reseed::check(facts).is_ok() => {
            assert!(!facts.entropy.is_empty() && facts.entropy.len() <= MAX_ENTROPY_LEN);
            assert!(!facts.hostname.contains('/') && facts.hostname.len() <= 64);
        }
        Request::Mount { mounts } => {
            for m in mounts {
                check_target(&m.target);
                if check_share_tag(&m.tag).is_ok() {
                    assert!(!m.tag.is_empty() && m.tag.len() <= MAX_TAG_LEN && m.tag.is_ascii());
                }
            }
        }
        Request::Unmount { targets } => targets.iter().for_each(|t| check_target(t)),
        Request::PutLayer { digest, .. } => check_digest(digest),
        Request::MissingLayers { digests } => digests.iter().for_each(|d| check_digest(d)),
        Request::RecordImage(record) => {
            check_digest(&record.digest);
            record.layers.iter().for_each(|l| check_digest(&l.digest));
        }
        _ => {}
    }
}

/// A target that passes names a directory below the root, not above it.
fn check_target(t: &str) {
    if check_mount_target(t).is_ok() {
        let p = Path::new(t);
        assert!(p.is_absolute() && t.len() <= MAX_TARGET_LEN && !t.contains('\0'));
        assert!(
            p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
            "mount target {t:?} passed the check"
        );
        assert_ne!(t, "/");
    }
}

/// The store names files after a digest's hex.
fn check_digest(d: &str) {
    if let Ok(hex) = digest_hex(d) {
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "digest {d:?}");
    }
}

fn host_side(data: &[u8]) {
    let mut sync_conn = data;
    let mut async_conn = data;
    loop {
        let a = now(asyncio::read_frame(&mut async_conn));
        let s = read_frame(&mut sync_conn);
        let frame = match (a, s) {
            (Ok(Some(a)), Ok(Some(s))) => {
                assert_eq!(a, s, "the two readers disagree");
                a
            }
            (Ok(None), Ok(None)) => return,
            (Err(a), Err(s)) => {
                assert_eq!(kind(&a), kind(&s), "the two readers fail apart: {a} / {s}");
                return;
            }
            (a, s) => panic!("the two readers disagree: {a:?} / {s:?}"),
        };
        assert!(frame.payload.len() <= MAX_FRAME_LEN as usize);
        match frame.kind {
            FrameKind::Response => parse_back::<Response>(&frame, "response"),
            FrameKind::Error => parse_back::<AgentError>(&frame, "error"),
            FrameKind::Exit => parse_back::<ExitStatus>(&frame, "exit"),
            // Output and file data are passed on as they are.
            _ => {}
        }
    }
}

fn kind(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::UnknownKind(_) => "unknown kind",
        ProtocolError::TooLarge(_) => "too large",
        ProtocolError::Json { .. } => "json",
        ProtocolError::Unexpected { .. } => "unexpected",
        ProtocolError::Truncated => "truncated",
        ProtocolError::Io(_) => "io",
    }
}

fn parse_back<T>(frame: &Frame, what: &'static str)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = frame.parse::<T>(what) {
        round_trip(&msg);
    }
}

fn round_trip<T>(msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let again = Frame::json(FrameKind::Response, msg);
    match again.parse::<T>("again") {
        Ok(back) => assert_eq!(&back, msg, "a message does not read back as itself"),
        Err(e) => panic!("{msg:?} does not read back: {e}"),
    }
}

/// Polls a future that cannot wait (it reads from a slice) to its end.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from a slice waited"),
    }
}
