//! The 8250 UART at 0x3f8 (COM1), IRQ 4: the guest console.
//!
//! vm-superio models the registers; its interrupt is an irqfd, and what the
//! guest transmits goes to the console log, a line at a time. The console
//! is also watched for a kernel panic line, so that the reset `panic=-1`
//! triggers right after is reported as a crash.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::exit::ExitState;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;
/// The other legacy UART ports the kernel probes; nothing answers there.
pub const ABSENT_UARTS: [u64; 3] = [0x2f8, 0x3e8, 0x2e8];

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Longest line kept in memory; longer lines are written out in pieces.
const LINE_MAX: usize = 4096;
/// Most bytes the console log file holds. Past it the file starts over
/// with a note, so a guest that prints without end fills no host disk,
/// and the newest output (what a failed boot's console tail quotes) is
/// kept.
pub const CONSOLE_LOG_MAX: u64 = 16 << 20;

/// Raises the serial interrupt through its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go: the log file, whole lines at a time.
pub struct ConsoleLog {
    file: Option<File>,
    line: Vec<u8>,
    exit: Arc<ExitState>,
    /// Bytes in the file now, and the most it may hold.
    written: u64,
    limit: u64,
}

impl ConsoleLog {
    /// `file` is opened for appending (a restored VM's log goes on).
    pub fn new(file: Option<File>, exit: Arc<ExitState>) -> Self {
        let written = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        ConsoleLog {
            file,
            line: Vec::with_capacity(256),
            exit,
            written,
            limit: CONSOLE_LOG_MAX,
        }
    }

    /// The same with another size limit (tests).
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// Empties an append-mode file that reached its limit, noting why.
    fn start_over(&mut self, f: &mut File) -> io::Result<()> {
        f.set_len(0)?;
        let note = format!(
            "[smol: the console log reached {} bytes and started over]\n",
            self.limit
        );
        f.write_all(note.as_bytes())?;
        self.written = note.len() as u64;
        Ok(())
    }

    fn emit_line(&mut self) -> io::Result<()> {
        if self.line.ends_with(b"\n")
            && self
                .line
                .windows(PANIC_MARKER.len())
                .any(|w| w == PANIC_MARKER)
        {
            let text = String::from_utf8_lossy(&self.line);
            self.exit.note_panic(text.trim().to_string());
        }
        let res = match self.file.take() {
            Some(mut f) => {
                let mut r = Ok(());
                if self.written + self.line.len() as u64 > self.limit {
                    r = self.start_over(&mut f);
                }
                let r = r.and_then(|()| f.write_all(&self.line));
                self.written += self.line.len() as u64;
                self.file = Some(f);
                r
            }
            None => Ok(()),
        };
        self.line.clear();
        res
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= LINE_MAX {
                self.emit_line()?;
            }
        }
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte; lines are written when they end.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let _ = self.emit_line();
        }
    }
}

/// COM1 on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleLog>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleLog) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// COM1 as it was at a snapshot (untrusted: an overfull FIFO is refused).
    pub fn restore(irq: EventFd, out: ConsoleLog, state: &SerialSnapshot) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(SerialDevice { serial })
    }
}

/// COM1 in a snapshot (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.serial.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, data[0]) {
                tracing::debug!(error = ?e, "serial write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExitReason;
    use std::io::Read;

    #[test]
    fn console_bytes_reach_the_log_by_line() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let exit = Arc::new(ExitState::new());
        let log = ConsoleLog::new(Some(tmp.reopen().unwrap()), exit.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), log);
        for b in b"Linux version 6.1\npartial" {
            dev.write(0, &[*b]);
        }
        let mut s = String::new();
        tmp.reopen().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "Linux version 6.1\n");
        drop(dev);
        let mut s = String::new();
        tmp.reopen().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "Linux version 6.1\npartial");
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn the_log_starts_over_at_its_limit_keeping_the_newest() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path())
            .unwrap();
        let exit = Arc::new(ExitState::new());
        let mut log = ConsoleLog::new(Some(file), exit).with_limit(1000);
        for i in 0..500 {
            log.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let text = std::fs::read_to_string(tmp.path()).unwrap();
        assert!(text.len() <= 1000, "{} bytes", text.len());
        assert!(
            text.starts_with("[smol: the console log reached 1000 bytes"),
            "{text}"
        );
        assert!(text.ends_with("line 0499\n"), "{text}");
    }

    #[test]
    fn panic_line_is_noted() {
        let exit = Arc::new(ExitState::new());
        let mut log = ConsoleLog::new(None, exit.clone());
        log.write_all(b"[ 1.0] Kernel panic - not syncing: No working init found.\n")
            .unwrap();
        exit.guest_reset();
        match exit.reason() {
            Some(ExitReason::Crashed(l)) => assert!(l.contains("No working init found"), "{l}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transmit_raises_the_interrupt_when_enabled() {
        let exit = Arc::new(ExitState::new());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), ConsoleLog::new(None, exit));
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        assert!(irq.read().unwrap() >= 1);
        // Odd sizes are ignored, not fatal.
        dev.write(0, &[1, 2]);
        let mut wide = [0u8; 2];
        dev.read(5, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
