//! Exec over a Unix socket pair with real processes (host programs).

use std::time::{Duration, Instant};

use super::*;
use crate::protocol::{Request, TtySize};
use crate::server::testing::{connect, exec_req, run};

fn alive(pid: i32) -> bool {
    // Gone, or a zombie nobody reaped yet, counts as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_dead(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn argv_passes_through_untouched() {
    let o = run(exec_req(&[
        "printf", "[%s]", "a b", "it's", "\"q\"", "$HOME", "*", "",
    ]));
    assert_eq!(o.out(), "[a b][it's][\"q\"][$HOME][*][]");
    assert_eq!(
        o.exit.unwrap(),
        ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false
        }
    );
    assert!(o.pid.is_some());
}

#[test]
fn exit_codes_and_signals() {
    let o = run(exec_req(&["sh", "-c", "exit 3"]));
    assert_eq!(o.exit.unwrap().code, Some(3));
    let o = run(exec_req(&["sh", "-c", "kill -9 $$"]));
    assert_eq!(
        o.exit.unwrap(),
        ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: false
        }
    );
}

#[test]
fn programs_start_with_no_blocked_or_ignored_signals() {
    // The agent ignores SIGPIPE (Rust's default) and blocks SIGTERM as PID 1.
    let o = run(exec_req(&[
        "grep",
        "-E",
        "^Sig(Ign|Blk)",
        "/proc/self/status",
    ]));
    let field = |name: &str| {
        let line = o
            .out()
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(field("SigBlk"), 0);
    let sigpipe_bit = 1u64 << (libc::SIGPIPE - 1);
    assert_eq!(field("SigIgn") & sigpipe_bit, 0, "SIGPIPE is still ignored");
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let o = run(exec_req(&["sh", "-c", "echo out; echo err >&2; echo out2"]));
    assert_eq!(o.out(), "out\nout2\n");
    assert_eq!(o.err(), "err\n");
}

#[test]
fn env_and_workdir() {
    let mut req = exec_req(&["sh", "-c", "echo \"$FOO|$HOME|$PATH\"; pwd"]);
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.workdir = Some("/tmp".into());
    let o = run(req);
    assert_eq!(
        o.out(),
        format!("bar baz|/root|{}\n/tmp\n", crate::system::DEFAULT_PATH)
    );
    // The environment is not inherited from the agent.
    let mut req = exec_req(&["sh", "-c", "echo ${CARGO_MANIFEST_DIR:-unset}"]);
    req.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    assert_eq!(run(req).out(), "unset\n");
}

#[test]
fn stdin_is_dev_null_by_default() {
    let o = run(exec_req(&["cat"]));
    assert_eq!(o.out(), "");
    assert_eq!(o.exit.unwrap().code, Some(0));
}

#[test]
fn stdin_frames_feed_the_program() {
    let mut c = connect();
    let mut req = exec_req(&["sh", "-c", "cat; echo done"]);
    req.stdin = true;
    c.send(&Request::Exec(req));
    write_frame(&mut c.conn, FrameKind::Stdin, b"hello ").unwrap();
    write_frame(&mut c.conn, FrameKind::Stdin, b"world\n").unwrap();
    write_frame(&mut c.conn, FrameKind::Eof, &[]).unwrap();
    let o = c.collect();
    assert_eq!(o.out(), "hello world\ndone\n");
    assert_eq!(o.exit.unwrap().code, Some(0));
}

#[test]
fn timeout_kills_the_whole_group() {
    let mut req = exec_req(&["sh", "-c", "sleep 600 & echo $!; sleep 600"]);
    req.timeout_ms = Some(300);
    let t = Instant::now();
    let o = run(req);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let exit = o.exit.unwrap();
    assert!(exit.timed_out);
    assert_eq!(exit.signal, Some(9));
    let background: i32 = o.out().trim().parse().unwrap();
    assert!(
        wait_dead(background),
        "background sleep {background} survived"
    );
}

#[test]
fn a_program_that_ends_in_time_is_not_timed_out() {
    let mut req = exec_req(&["true"]);
    req.timeout_ms = Some(60_000);
    let exit = run(req).exit.unwrap();
    assert_eq!(
        exit,
        ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false
        }
    );
}

#[test]
fn output_streams_as_produced() {
    let mut c = connect();
    c.send(&Request::Exec(exec_req(&[
        "sh",
        "-c",
        "echo first; sleep 1; echo second",
    ])));
    let t = Instant::now();
    let mut first_at = None;
    let mut out = Vec::new();
    while let Some(f) = c.frame() {
        if f.kind == FrameKind::Stdout {
            first_at.get_or_insert(t.elapsed());
            out.extend_from_slice(&f.payload);
        }
    }
    assert_eq!(out, b"first\nsecond\n");
    assert!(
        first_at.unwrap() < Duration::from_millis(800),
        "first output after {first_at:?}"
    );
    assert!(t.elapsed() >= Duration::from_secs(1));
}

#[test]
fn large_output_arrives_complete() {
    let o = run(exec_req(&["seq", "1", "300000"]));
    let expected: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(o.stdout.len(), expected.len());
    assert!(o.stdout == expected.as_bytes());
}

#[test]
fn background_child_holding_stdout_does_not_block_the_exit() {
    let t = Instant::now();
    let o = run(exec_req(&["sh", "-c", "sleep 3 & echo started"]));
    assert_eq!(o.out(), "started\n");
    assert_eq!(o.exit.unwrap().code, Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn concurrent_execs_do_not_wait_for_each_other() {
    let t = Instant::now();
    let slow = std::thread::spawn(|| run(exec_req(&["sleep", "2"])));
    std::thread::sleep(Duration::from_millis(100));
    let fast: Vec<_> = (0..7)
        .map(|i| {
            std::thread::spawn(move || (run(exec_req(&["echo", &i.to_string()])), Instant::now()))
        })
        .collect();
    for (i, h) in fast.into_iter().enumerate() {
        let (o, done) = h.join().unwrap();
        assert_eq!(o.out(), format!("{i}\n"));
        assert!(
            done - t < Duration::from_millis(1500),
            "fast exec {i} waited for the slow one"
        );
    }
    assert_eq!(slow.join().unwrap().exit.unwrap().code, Some(0));
}

#[test]
fn sixty_four_concurrent_execs_get_their_own_output() {
    // Many spawns at once share the agent's memory with their vfork
    // children: each must still run its own argv with its own pipes.
    let handles: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let o = run(exec_req(&[
                    "sh",
                    "-c",
                    &format!("echo out-{i}; echo err-{i} >&2; exit {}", i % 7),
                ]));
                (i, o)
            })
        })
        .collect();
    for h in handles {
        let (i, o) = h.join().unwrap();
        assert_eq!(o.out(), format!("out-{i}\n"), "{o:?}");
        assert_eq!(String::from_utf8_lossy(&o.stderr), format!("err-{i}\n"));
        assert_eq!(o.exit.unwrap().code, Some(i % 7));
    }
}

#[test]
fn host_disconnect_kills_the_program() {
    let mut c = connect();
    let pid = started(&mut c, exec_req(&["sleep", "600"])) as i32;
    assert!(alive(pid));
    drop(c);
    assert!(wait_dead(pid), "sleep {pid} survived the host going away");
}

#[test]
fn backpressure_blocks_the_program() {
    let mut c = connect();
    let pid = started(&mut c, exec_req(&["yes"])) as i32;
    // Not reading: socket buffer and pipe fill up, then `yes` sleeps in write.
    std::thread::sleep(Duration::from_millis(500));
    let state = |pid: i32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        s.rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .chars()
            .next()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(pid) != 'S' && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state(pid), 'S', "yes keeps running while nobody reads");
    // The output is still flowing once we read.
    let f = c.frame().unwrap();
    assert_eq!(f.kind, FrameKind::Stdout);
    assert!(f.payload.starts_with(b"y\ny\n"));
    drop(c);
    assert!(wait_dead(pid));
}

#[test]
fn bad_requests_get_named_errors() {
    let cases: Vec<(ExecRequest, ErrorKind, &str)> = vec![
        (exec_req(&[]), ErrorKind::InvalidArgument, "argv is empty"),
        (
            exec_req(&["no-such-program-xyz"]),
            ErrorKind::NotFound,
            "no-such-program-xyz",
        ),
        (
            exec_req(&["/no/such/bin"]),
            ErrorKind::NotFound,
            "/no/such/bin",
        ),
        (
            ExecRequest {
                workdir: Some("/no/such/dir".into()),
                ..exec_req(&["true"])
            },
            ErrorKind::NotFound,
            "/no/such/dir",
        ),
        (
            ExecRequest {
                workdir: Some("/etc/passwd".into()),
                ..exec_req(&["true"])
            },
            ErrorKind::NotADirectory,
            "/etc/passwd",
        ),
        (
            ExecRequest {
                env: vec![("".into(), "v".into())],
                ..exec_req(&["true"])
            },
            ErrorKind::InvalidArgument,
            "empty",
        ),
        (
            ExecRequest {
                env: vec![("A=B".into(), "v".into())],
                ..exec_req(&["true"])
            },
            ErrorKind::InvalidArgument,
            "A=B",
        ),
        (
            ExecRequest {
                env: vec![("A\0".into(), "v".into())],
                ..exec_req(&["true"])
            },
            ErrorKind::InvalidArgument,
            "A\\0",
        ),
        (
            exec_req(&["echo", "a\0b"]),
            ErrorKind::InvalidArgument,
            "argv[1]",
        ),
        (
            ExecRequest {
                timeout_ms: Some(0),
                ..exec_req(&["true"])
            },
            ErrorKind::InvalidArgument,
            "timeout_ms",
        ),
        (
            exec_req(&["/etc/passwd"]),
            ErrorKind::PermissionDenied,
            "/etc/passwd",
        ),
        (exec_req(&["/tmp"]), ErrorKind::PermissionDenied, "/tmp"),
    ];
    for (req, kind, needle) in cases {
        let argv = req.argv.clone();
        let o = run(req);
        let Some(e) = o.error.clone() else {
            panic!("no error for {argv:?}: {o:?}")
        };
        assert_eq!(e.kind, kind, "{argv:?}: {e:?}");
        assert!(
            e.message.contains(needle),
            "{argv:?}: {:?} does not name {needle:?}",
            e.message
        );
        assert!(o.pid.is_none() && o.exit.is_none());
    }
}

#[test]
fn script_without_interpreter_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.sh");
    std::fs::write(&script, "#!/no/such/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = run(exec_req(&[script.to_str().unwrap()]));
    let e = o.error.unwrap();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("s.sh"), "{}", e.message);
}

#[test]
fn resolution_follows_the_request_path() {
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("mytool");
    std::fs::write(&tool, "#!/bin/sh\necho mine\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut req = exec_req(&["mytool"]);
    req.env = vec![("PATH".into(), format!("{}:/bin", dir.path().display()))];
    assert_eq!(run(req).out(), "mine\n");
    // Relative to the workdir when argv[0] has a slash.
    let req = ExecRequest {
        workdir: Some(dir.path().display().to_string()),
        ..exec_req(&["./mytool"])
    };
    assert_eq!(run(req).out(), "mine\n");
}

/// Issue 19: a `Signal` on a connection of its own reaches the running
/// command, even one whose stdin is full; a pid the agent did not start,
/// or a number that is no signal, is a named error.
#[test]
fn a_signal_reaches_the_running_command() {
    let mut c = connect();
    let mut req = exec_req(&["sleep", "100"]);
    // Stdin open and never read: the signal must not wait behind it.
    req.stdin = true;
    let pid = started(&mut c, req);
    // More than the pipe holds, less than the socket does.
    write_frame(&mut c.conn, FrameKind::Stdin, &[b'x'; 100_000]).unwrap();
    let mut s = connect();
    s.send(&Request::Signal {
        pid,
        signal: libc::SIGTERM,
    });
    assert_eq!(s.response().unwrap(), Response::Ok);
    let o = c.collect();
    assert_eq!(o.exit.unwrap().signal, Some(libc::SIGTERM));

    // It ended: its pid is no longer the agent's to signal.
    let mut s = connect();
    s.send(&Request::Signal { pid, signal: 15 });
    assert_eq!(s.response().unwrap_err().kind, ErrorKind::NotFound);
    let mut s = connect();
    s.send(&Request::Signal {
        pid: std::process::id(),
        signal: 15,
    });
    assert_eq!(s.response().unwrap_err().kind, ErrorKind::NotFound);
    let mut s = connect();
    s.send(&Request::Signal { pid, signal: 999 });
    let e = s.response().unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
    assert!(e.message.contains("999"), "{e:?}");
}

/// Sends `req` on `c` and returns the pid of its `Started`.
fn started(c: &mut crate::server::testing::Client, req: ExecRequest) -> u32 {
    c.send(&Request::Exec(req));
    match c.response().unwrap() {
        Response::Started { pid } => pid,
        other => panic!("{other:?}"),
    }
}

fn tty_req(argv: &[&str], cols: u16, rows: u16) -> ExecRequest {
    ExecRequest {
        tty: Some(TtySize { cols, rows }),
        ..exec_req(argv)
    }
}

/// Issue 19: on a terminal, the program sees a tty of the asked size and
/// TERM, its stderr comes merged into stdout, and input ends with ^D.
#[test]
fn a_program_on_a_terminal_sees_one() {
    let o = run(tty_req(
        &["sh", "-c", "tty; stty size; echo $TERM; echo to-stderr >&2"],
        80,
        24,
    ));
    let out = o.out().replace('\r', "");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(
        &lines[1..],
        ["24 80", "xterm-256color", "to-stderr"],
        "{out:?}"
    );
    assert_eq!(o.err(), "", "stderr is the terminal");
    assert_eq!(o.exit.unwrap().code, Some(0));

    // No input: reading the terminal ends at once.
    let o = run(tty_req(&["sh", "-c", "cat; echo after"], 80, 24));
    assert!(o.out().contains("after"), "{:?}", o.out());

    // Input, then its end.
    let mut c = connect();
    let mut req = tty_req(&["sh", "-c", "read x; stty size; echo got $x; cat"], 80, 24);
    req.stdin = true;
    let pid = started(&mut c, req);
    let mut r = connect();
    r.send(&Request::Resize {
        pid,
        size: TtySize {
            cols: 100,
            rows: 30,
        },
    });
    assert_eq!(r.response().unwrap(), Response::Ok);
    write_frame(&mut c.conn, FrameKind::Stdin, b"hello\n").unwrap();
    write_frame(&mut c.conn, FrameKind::Eof, &[]).unwrap();
    let o = c.collect();
    let out = o.out().replace('\r', "");
    assert!(out.contains("30 100\ngot hello\n"), "{out:?}");
    assert_eq!(o.exit.unwrap().code, Some(0), "cat ended at ^D");

    // A size of zero, and a resize of a command with no terminal.
    let e = run(tty_req(&["true"], 0, 24)).error.unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
    let mut c = connect();
    let mut req = exec_req(&["sleep", "100"]);
    req.stdin = true;
    let pid = started(&mut c, req);
    let mut r = connect();
    r.send(&Request::Resize {
        pid,
        size: TtySize { cols: 1, rows: 1 },
    });
    let e = r.response().unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
    assert!(e.message.contains("no terminal"), "{e:?}");
    let mut s = connect();
    s.send(&Request::Signal { pid, signal: 9 });
    assert_eq!(s.response().unwrap(), Response::Ok);
    assert_eq!(c.collect().exit.unwrap().signal, Some(9));
}

#[test]
fn applets_are_known_by_their_name() {
    let list = "bin/ls\nusr/bin/[\nsbin/udhcpc\n";
    assert!(is_applet(list, "ls"));
    assert!(is_applet(list, "["));
    assert!(is_applet(list, "udhcpc"));
    assert!(!is_applet(list, "bin"));
    assert!(!is_applet(list, "l"));
    assert!(!is_applet(list, "python3"));
}
