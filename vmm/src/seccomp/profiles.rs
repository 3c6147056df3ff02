//! The syscalls each monitor thread may make.
//!
//! Measured with `strace -ff` on cold boots, warm restores, snapshots, execs,
//! file copies, mounts and network, then with `SMOL_SECCOMP=log` over the
//! whole test suite (the kernel logs every call a profile lacks as an audit
//! record of type 1326). Every thread also gets [`COMMON`]: what the Rust
//! runtime, glibc's allocator, `tracing` to a file descriptor and a panic
//! need on any thread.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::Profile;

/// Rules by syscall number; an empty list allows the call outright.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allowed with any arguments on every filtered thread.
const COMMON: &[i64] = &[
    // Memory: the allocator, thread stacks, unwinding.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Locks, condition variables, channels, parking.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The signal the vCPUs are kicked with, and the runtime's own handling
    // of signals (the stack-overflow guard's alternate stack).
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // Clocks and sleeps.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // Identity: glibc's `pthread_kill` asks for the pid; HashMap seeds.
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
    // Dropping an fd; `tracing` and panic messages to stderr or a log fd.
    libc::SYS_close,
    libc::SYS_write,
    libc::SYS_writev,
    // The thread's own end.
    libc::SYS_exit,
];

/// A vCPU: `KVM_RUN`, the state reads of a snapshot and of a stuck-guest
/// report, and the device emulation its exits run (eventfd writes,
/// duplicating an eventfd on activation).
const VCPU: &[i64] = &[libc::SYS_read];

/// The event loop: epoll, eventfds, the vsock and passt sockets, the
/// vhost-user messages of virtio-fs (with fds), the guest's connections to
/// host ports, and removing the vsock socket file at the end.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// A disk's I/O thread: vectored reads and writes at offsets, flushes,
/// discards and write-zeroes as `fallocate`, and its completion eventfd.
const BLOCK_IO: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_read,
];

/// The console log writer: appends, and empties the file at its limit.
const CONSOLE: &[i64] = &[libc::SYS_ftruncate];

/// The vhost-user watchdog: shuts a silent back end's socket down.
const VHOST_WATCH: &[i64] = &[libc::SYS_shutdown];

/// The PIT tuning thread: one `KVM_REINJECT_CONTROL`, nothing of its own.
const PIT_TUNING: &[i64] = &[];

// The KVM vCPU ioctls (linux/kvm.h, x86). kvm-ioctls keeps its own private.
vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE2,
    kvm_bindings::KVMIO,
    0xcf,
    kvm_bindings::kvm_xsave
);

/// The rules of `profile`; `kick` is the vCPU kick signal.
pub fn rules(profile: Profile, kick: libc::c_int) -> Result<Rules, seccompiler::BackendError> {
    let (own, ioctls, fcntls): (&[i64], Vec<u64>, &[u64]) = match profile {
        Profile::Vcpu => (
            VCPU,
            vec![
                KVM_RUN(),
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_GET_CPUID2(),
                KVM_GET_MP_STATE(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_XSAVE(),
                KVM_GET_XSAVE2(),
                KVM_GET_XCRS(),
            ],
            &[libc::F_DUPFD_CLOEXEC as u64],
        ),
        Profile::EventLoop => (
            EVENT_LOOP,
            vec![libc::FIONBIO],
            &[
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
            ],
        ),
        Profile::BlockIo => (BLOCK_IO, Vec::new(), &[]),
        Profile::Console => (CONSOLE, Vec::new(), &[]),
        Profile::VhostWatch => (VHOST_WATCH, Vec::new(), &[]),
        Profile::PitTuning => (PIT_TUNING, vec![crate::vm::KVM_REINJECT_CONTROL()], &[]),
    };
    let mut rules = Rules::new();
    for &nr in COMMON.iter().chain(own) {
        rules.insert(nr, Vec::new());
    }
    // Signals: only the vCPU kick (`ExitState::kick_vcpus` runs wherever the
    // VM ends) and SIGABRT, so that an abort still ends the process.
    rules.insert(
        libc::SYS_tgkill,
        [kick, libc::SIGABRT]
            .into_iter()
            .map(|sig| arg_eq(2, sig as u64))
            .collect::<Result<_, _>>()?,
    );
    if !ioctls.is_empty() {
        rules.insert(
            libc::SYS_ioctl,
            ioctls
                .into_iter()
                .map(|req| arg_eq(1, req))
                .collect::<Result<_, _>>()?,
        );
    }
    // F_GETFD everywhere: std checks that an fd is open before closing it
    // (in builds with debug assertions).
    rules.insert(
        libc::SYS_fcntl,
        std::iter::once(&(libc::F_GETFD as u64))
            .chain(fcntls)
            .map(|&cmd| arg_eq(1, cmd))
            .collect::<Result<_, _>>()?,
    );
    if profile == Profile::EventLoop {
        // Only Unix sockets: the guest's connections to `<uds>_<port>`.
        rules.insert(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
    }
    Ok(rules)
}

/// A rule matching when argument `index` (as a 32-bit value) is `value`.
fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}
