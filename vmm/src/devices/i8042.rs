//! A minimal i8042 keyboard controller: enough for `reboot=k`.
//!
//! The kernel's keyboard reset polls the status port until the input buffer
//! is empty, then writes the pulse-reset command 0xfe; that write is the
//! guest's way to end the VM. A status of 0 ("nothing pending") makes the
//! poll end at once (answering 0xff would cost 65,536 reads first).

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::exit::ExitState;

/// The device covers ports 0x60..=0x64.
pub const PORT_BASE: u64 = 0x60;
pub const PORT_LEN: u64 = 5;
const DATA: u64 = 0;
const COMMAND_STATUS: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<ExitState>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitState>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // Empty output buffer, empty input buffer, no error.
            DATA | COMMAND_STATUS => data.fill(0),
            // 0x61-0x63 are not ours (KVM's PIT serves 0x61).
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_STATUS && data.first() == Some(&CMD_RESET_CPU) {
            tracing::debug!("guest reset through the i8042");
            self.exit.guest_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExitReason;

    #[test]
    fn status_is_idle_and_reset_ends_the_vm() {
        let exit = Arc::new(ExitState::new());
        let mut dev = I8042::new(exit.clone());
        let mut b = [0xaa];
        dev.read(COMMAND_STATUS, &mut b);
        assert_eq!(b, [0]);
        dev.write(COMMAND_STATUS, &[0xad]); // disable keyboard: ignored
        dev.write(DATA, &[0xfe]); // data port, not a command
        assert_eq!(exit.reason(), None);
        dev.write(COMMAND_STATUS, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestShutdown));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut dev = I8042::new(Arc::new(ExitState::new()));
        dev.write(COMMAND_STATUS, &[]);
        let mut wide = [0u8; 4];
        dev.read(2, &mut wide);
        assert_eq!(wide, [0xff; 4]);
    }
}
