//! Making a restored machine itself: a snapshot brings back the guest's
//! random pool, clock and hostname as they were, so every clone of one
//! golden would share them. The host sends [`MachineFacts`] after each boot
//! and restore; the agent mixes the entropy into the pool and reseeds the
//! CRNG (RNDADDENTROPY, RNDRESEEDCRNG), steps the wall clock and sets the
//! hostname.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::protocol::{AgentError, ErrorKind, MachineFacts, MAX_ENTROPY_LEN};
use crate::system::valid_hostname;

// RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    u8
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// The host's clock in the newest facts applied. Facts come with every
/// Hello, and a boot tries Hello many times: an attempt the host gave up on
/// can still be served after a newer one (or, in a clone, after the
/// clone's own), and must not set the clock or hostname back.
static NEWEST: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

/// Whether facts from host time `ns` are newer than the newest applied
/// (`newest`), which they then become.
fn take_if_newer(newest: &mut u64, ns: u64) -> bool {
    if ns <= *newest {
        return false;
    }
    *newest = ns;
    true
}

/// Applies `facts` unless newer ones were applied already; the first
/// failure is returned, after trying the rest.
pub fn apply(facts: &MachineFacts) -> Result<(), AgentError> {
    check(facts)?;
    // Held while applying, so an older set cannot interleave with a newer.
    let mut newest = NEWEST.lock().unwrap_or_else(|e| e.into_inner());
    if !take_if_newer(&mut newest, facts.unix_time_ns) {
        crate::log(format_args!(
            "refresh: ignoring facts older than the ones applied"
        ));
        return Ok(());
    }
    let mut first: Option<AgentError> = None;
    let mut note = |e: AgentError| {
        crate::log(format_args!("refresh: {}", e.message));
        first.get_or_insert(e);
    };
    if let Err(e) = add_entropy(&facts.entropy) {
        note(e);
    }
    if let Err(e) = set_clock(facts.unix_time_ns) {
        note(e);
    }
    if let Err(e) = nix::unistd::sethostname(&facts.hostname) {
        note(AgentError::new(
            ErrorKind::Io,
            format!("cannot set hostname {:?}: {e}", facts.hostname),
        ));
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Refuses facts no host of ours sends.
pub fn check(facts: &MachineFacts) -> Result<(), AgentError> {
    let bad = |m: String| Err(AgentError::new(ErrorKind::InvalidArgument, m));
    if facts.entropy.is_empty() || facts.entropy.len() > MAX_ENTROPY_LEN {
        return bad(format!(
            "{} entropy bytes (1 to {MAX_ENTROPY_LEN})",
            facts.entropy.len()
        ));
    }
    if !valid_hostname(&facts.hostname) {
        return bad(format!("invalid hostname {:?}", facts.hostname));
    }
    if facts.unix_time_ns == 0 {
        return bad("a clock of 0".into());
    }
    Ok(())
}

fn add_entropy(bytes: &[u8]) -> Result<(), AgentError> {
    let io = |what: &str, e: &dyn std::fmt::Display| {
        AgentError::new(ErrorKind::Io, format!("{what}: {e}"))
    };
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| io("cannot open /dev/urandom", &e))?;
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    let bits = (bytes.len() * 8) as libc::c_int;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as libc::c_int).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` is a rand_pool_info header followed by `buf_size`
    // bytes, all inside the buffer, alive for the call.
    unsafe { rnd_add_entropy(random.as_raw_fd(), info.as_ptr()) }
        .map_err(|e| io("RNDADDENTROPY", &e))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { rnd_reseed_crng(random.as_raw_fd()) }.map_err(|e| io("RNDRESEEDCRNG", &e))?;
    Ok(())
}

fn set_clock(unix_time_ns: u64) -> Result<(), AgentError> {
    let ts = nix::sys::time::TimeSpec::new(
        (unix_time_ns / 1_000_000_000) as libc::time_t,
        (unix_time_ns % 1_000_000_000) as libc::c_long,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| AgentError::new(ErrorKind::Io, format!("cannot set the clock: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> MachineFacts {
        MachineFacts {
            entropy: vec![7; 64],
            unix_time_ns: 1_800_000_000_000_000_000,
            hostname: "clone-1".into(),
        }
    }

    #[test]
    fn older_facts_are_ignored() {
        let mut newest = 0;
        assert!(take_if_newer(&mut newest, 100));
        assert!(
            !take_if_newer(&mut newest, 50),
            "an attempt the host gave up on"
        );
        assert!(!take_if_newer(&mut newest, 100), "the same facts again");
        assert!(take_if_newer(&mut newest, 101));
        assert_eq!(newest, 101);
    }

    #[test]
    fn bad_facts_are_refused_by_name() {
        assert!(check(&facts()).is_ok());
        let mut f = facts();
        f.entropy = vec![0; MAX_ENTROPY_LEN + 1];
        let e = check(&f).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("513 entropy bytes"), "{}", e.message);
        let mut f = facts();
        f.hostname = "bad name".into();
        assert!(check(&f).unwrap_err().message.contains("bad name"));
        let mut f = facts();
        f.unix_time_ns = 0;
        assert!(check(&f).is_err());
    }
}
