//! The 8250 UART at 0x3f8 (COM1), IRQ 4: the guest console.
//!
//! vm-superio models the registers; its interrupt is an irqfd, and what the
//! guest transmits goes to the console log, a line at a time, written by a
//! thread of the log's own. The console
//! is also watched for a kernel panic line, so that the reset `panic=-1`
//! triggers right after is reported as a crash.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

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

/// Lines waiting for the log's writer thread. A guest that prints faster
/// than the file takes it loses the lines past this (counted, and noted
/// in the log) instead of stalling its vCPU.
const QUEUE_LINES: usize = 1024;

/// Where console bytes go: the log file, whole lines at a time, written by
/// a thread of the log's own so that a slow disk never holds the vCPU that
/// prints. The panic line is looked for here, on the vCPU, in order.
pub struct ConsoleLog {
    line: Vec<u8>,
    exit: Arc<ExitState>,
    /// The file and its size, until the first line starts the writer.
    file: Option<(File, u64)>,
    writer: Option<Writer>,
    limit: u64,
}

/// The writer thread and its queue.
struct Writer {
    tx: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
    /// Bytes dropped because the queue was full, not yet noted in the log.
    dropped: Arc<AtomicU64>,
}

impl ConsoleLog {
    /// `file` is opened for appending (a restored VM's log goes on).
    pub fn new(file: Option<File>, exit: Arc<ExitState>) -> Self {
        let file = file.map(|f| {
            let len = f.metadata().map_or(0, |m| m.len());
            (f, len)
        });
        ConsoleLog {
            line: Vec::with_capacity(256),
            exit,
            file,
            writer: None,
            limit: CONSOLE_LOG_MAX,
        }
    }

    /// The same with another size limit (tests).
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// The writer, started on the first line.
    fn writer(&mut self) -> Option<&mut Writer> {
        if self.writer.is_none() {
            let (file, written) = self.file.take()?;
            let (tx, rx) = sync_channel(QUEUE_LINES);
            let dropped = Arc::new(AtomicU64::new(0));
            let file = LogFile {
                file,
                written,
                limit: self.limit,
                dropped: dropped.clone(),
            };
            match crate::seccomp::spawn(
                "smol-console",
                crate::seccomp::Profile::Console,
                move || file.serve(rx),
            ) {
                Ok(thread) => {
                    self.writer = Some(Writer {
                        tx: Some(tx),
                        thread: Some(thread),
                        dropped,
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot start the console log writer; the console is not logged: {e}"
                    );
                    return None;
                }
            }
        }
        self.writer.as_mut()
    }

    fn emit_line(&mut self) {
        if self.line.ends_with(b"\n")
            && self
                .line
                .windows(PANIC_MARKER.len())
                .any(|w| w == PANIC_MARKER)
        {
            let text = String::from_utf8_lossy(&self.line);
            self.exit.note_panic(text.trim().to_string());
        }
        let line = std::mem::replace(&mut self.line, Vec::with_capacity(256));
        let Some(w) = self.writer() else { return };
        let Some(tx) = &w.tx else { return };
        if let Err(TrySendError::Full(line) | TrySendError::Disconnected(line)) = tx.try_send(line)
        {
            w.dropped.fetch_add(line.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Every queued line is written before the log is gone.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The file side, on the writer thread.
struct LogFile {
    file: File,
    /// Bytes in the file now, and the most it may hold.
    written: u64,
    limit: u64,
    dropped: Arc<AtomicU64>,
}

impl LogFile {
    fn serve(mut self, rx: Receiver<Vec<u8>>) {
        for line in rx {
            let lost = self.dropped.swap(0, Ordering::Relaxed);
            let r = if lost > 0 {
                let note = format!(
                    "[smol: {lost} bytes of console output dropped: the log could not keep up]\n"
                );
                self.write(note.as_bytes()).and_then(|()| self.write(&line))
            } else {
                self.write(&line)
            };
            if let Err(e) = r {
                tracing::warn!("cannot write the console log; the console is not logged: {e}");
                return;
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.written + bytes.len() as u64 > self.limit {
            self.start_over()?;
        }
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Empties an append-mode file that reached its limit, noting why.
    fn start_over(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        let note = format!(
            "[smol: the console log reached {} bytes and started over]\n",
            self.limit
        );
        self.file.write_all(note.as_bytes())?;
        self.written = note.len() as u64;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= LINE_MAX {
                self.emit_line();
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
            self.emit_line();
        }
        // Then the writer (a field) drops: it writes what is queued.
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
        // The writer thread gets the whole line soon; the partial one waits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut s = String::new();
        while s.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            tmp.reopen().unwrap().read_to_string(&mut s).unwrap();
        }
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
        drop(log);
        let text = std::fs::read_to_string(tmp.path()).unwrap();
        assert!(text.len() <= 1000, "{} bytes", text.len());
        assert!(
            text.starts_with("[smol: the console log reached 1000 bytes"),
            "{text}"
        );
        assert!(text.ends_with("line 0499\n"), "{text}");
    }

    /// Issue 15: a log that cannot keep up never holds the vCPU: lines
    /// past the queue are dropped, and the log says how many bytes.
    #[test]
    fn a_stalled_log_drops_lines_instead_of_blocking() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (mut reader, writer) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let exit = Arc::new(ExitState::new());
        let mut log = ConsoleLog::new(Some(writer), exit);
        // Nobody reads the pipe: the writer blocks once it is full (64 KiB).
        let t = std::time::Instant::now();
        let line = [b'x'; 99];
        for _ in 0..20_000 {
            log.write_all(&line).unwrap();
            log.write_all(b"\n").unwrap();
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "the printer was held: {:?}",
            t.elapsed()
        );
        let drain = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        // The lines still queued were queued before the loss: the first of
        // them out after it carries the note.
        drop(log);
        let all = String::from_utf8(drain.join().unwrap()).unwrap();
        assert!(
            all.len() < 2_000_000,
            "{} bytes: nothing dropped",
            all.len()
        );
        assert!(
            all.contains("bytes of console output dropped"),
            "no note of the loss"
        );
        assert!(all.ends_with(&format!("{}\n", "x".repeat(99))));
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
