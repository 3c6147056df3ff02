use super::*;

/// `Seccomp` and `Seccomp_filters` of thread `tid`, read from outside it
/// (a filtered thread may not open files).
fn filter_status(tid: libc::pid_t) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in the status of thread {tid}"))
            .trim()
            .parse()
            .unwrap()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The result of a raw call and its errno, as one value to compare.
fn outcome(ret: libc::c_long) -> Result<libc::c_long, i32> {
    if ret < 0 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret)
    }
}

fn open_status() -> Result<libc::c_long, i32> {
    // SAFETY: a NUL-terminated path that lives across the call.
    let fd = unsafe {
        libc::openat(
            libc::AT_FDCWD,
            c"/proc/self/status".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    let r = outcome(fd as libc::c_long);
    if fd >= 0 {
        // SAFETY: `fd` was just opened here and nothing else owns it.
        unsafe { libc::close(fd) };
    }
    r
}

fn socket(domain: libc::c_int) -> Result<libc::c_long, i32> {
    // SAFETY: plain syscall with constant arguments.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let r = outcome(fd as libc::c_long);
    if fd >= 0 {
        // SAFETY: `fd` was just created here and nothing else owns it.
        unsafe { libc::close(fd) };
    }
    r
}

fn ioctl(fd: libc::c_int, request: u64) -> Result<libc::c_long, i32> {
    let mut arg: libc::c_int = 1;
    // SAFETY: every request tried here either reads one int through the
    // pointer or fails on the fd before touching it.
    outcome(unsafe { libc::ioctl(fd, request as _, &mut arg) } as libc::c_long)
}

/// Runs `check` on a new thread under `profile`, enforced.
fn under<T: Send + 'static>(profile: Profile, check: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        install(profile, Mode::Enforce).unwrap();
        check()
    })
    .join()
    .unwrap()
}

#[test]
fn every_profile_compiles() {
    for profile in Profile::ALL {
        for mode in [Mode::Enforce, Mode::Log] {
            program(profile, mode).unwrap();
        }
    }
}

#[test]
fn a_vcpu_thread_may_run_kvm_but_not_open_connect_or_start_anything() {
    let (open, unix, ioctl_run, ioctl_other, thread, exec) = under(Profile::Vcpu, || {
        let thread = std::thread::Builder::new().spawn(|| ()).map(|_| ());
        // SAFETY: a NUL-terminated path and a NULL-terminated, empty argv
        // and envp, all living across the call (which is refused).
        let exec = outcome(unsafe {
            let argv: [*const libc::c_char; 2] = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr())
        } as libc::c_long);
        (
            open_status(),
            socket(libc::AF_UNIX),
            // Allowed: fails on the bad fd, not on the filter.
            ioctl(-1, profiles::KVM_RUN()),
            ioctl(0, libc::FIONBIO),
            thread.map_err(|e| e.raw_os_error()),
            exec,
        )
    });
    assert_eq!(open, Err(libc::EPERM), "openat");
    assert_eq!(unix, Err(libc::EPERM), "socket");
    assert_eq!(ioctl_run, Err(libc::EBADF), "KVM_RUN");
    assert_eq!(ioctl_other, Err(libc::EPERM), "FIONBIO");
    assert!(thread.is_err(), "a vcpu thread started a thread");
    assert_eq!(exec, Err(libc::EPERM), "execve");
}

#[test]
fn the_event_loop_may_reach_unix_sockets_only() {
    let (unix, inet, inet6, open) = under(Profile::EventLoop, || {
        (
            socket(libc::AF_UNIX),
            socket(libc::AF_INET),
            socket(libc::AF_INET6),
            open_status(),
        )
    });
    assert!(unix.is_ok(), "AF_UNIX: {unix:?}");
    assert_eq!(inet, Err(libc::EPERM), "AF_INET");
    assert_eq!(inet6, Err(libc::EPERM), "AF_INET6");
    assert_eq!(open, Err(libc::EPERM), "openat");
}

#[test]
fn a_disk_thread_may_write_its_file_but_not_make_sockets() {
    let file = tempfile::tempfile().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let (written, unix, kvm) = under(Profile::BlockIo, move || {
        let buf = *b"seccomp";
        // SAFETY: `buf` lives across the call; `fd` stays open (the test
        // holds `file` until the thread is joined).
        let written = outcome(
            unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), 4096) } as libc::c_long,
        );
        (
            written,
            socket(libc::AF_UNIX),
            ioctl(-1, profiles::KVM_RUN()),
        )
    });
    assert_eq!(written, Ok(7));
    assert_eq!(unix, Err(libc::EPERM), "socket");
    assert_eq!(kvm, Err(libc::EPERM), "ioctl");
    drop(file);
}

#[test]
fn threads_a_vcpu_starts_get_their_own_filter_only() {
    if Mode::from_env() != Mode::Enforce {
        println!("SKIPPED: SMOL_SECCOMP is set to {:?}", Mode::from_env());
        return;
    }
    let spawner = Spawner::new().unwrap();
    let (tids_tx, tids_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let vcpu = spawner
        .spawn("test-vcpu", Profile::Vcpu, move || {
            let child = spawn("test-blk", Profile::BlockIo, move || {
                let seen = (current(), socket(libc::AF_UNIX));
                // Stay alive until the test has read our status.
                let _ = done_rx.recv();
                seen
            })
            .unwrap();
            tids_tx.send(gettid()).unwrap();
            child.join().unwrap()
        })
        .unwrap();
    let vcpu_tid = tids_rx.recv().unwrap();
    // The child's tid: the one thread named test-blk.
    let child_tid = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "test-blk")
        })
        .expect("the disk thread is running");
    assert_eq!(filter_status(vcpu_tid), (2, 1), "the vcpu thread");
    assert_eq!(
        filter_status(child_tid),
        (2, 1),
        "the disk thread has one filter, not the vcpu's as well"
    );
    drop(done_tx);
    let (profile, unix) = vcpu.join().unwrap();
    assert_eq!(profile, Some(Profile::BlockIo));
    assert_eq!(unix, Err(libc::EPERM));
    drop(spawner);
}

#[test]
fn a_stopped_spawner_refuses_with_an_error() {
    let spawner = Spawner::new().unwrap();
    let handle = spawner.handle.clone();
    drop(spawner);
    let err = handle.spawn("late", Profile::BlockIo, || ()).unwrap_err();
    assert!(err.to_string().contains("stopping"), "{err}");
}
