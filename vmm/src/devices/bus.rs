//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::sync::{Arc, Mutex};

/// A device reached through port I/O or MMIO. `offset` is relative to the
/// start of the range the device was inserted at. Guest-controlled: sizes
/// and offsets can be anything, and must never panic the monitor.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BadRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(Error::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[i];
        let offset = addr - e.base;
        // The whole access must fall inside the range.
        (offset.checked_add(size as u64)? <= e.len).then_some((e, offset))
    }

    /// Dispatches a read; false if no device serves `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false if no device serves `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if a previous holder panicked: device state
/// stays usable, and a poisoned lock must not take every vCPU down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 1).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fa, &mut d));
        assert_eq!(d[0], 2);
        assert!(bus.write(0x60, &[0xfe]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![0xfe])]);
        assert!(!bus.read(0x61, &mut d));
        assert!(!bus.read(0x3f7, &mut d));
        assert!(!bus.read(0x400, &mut d));
        // An access straddling the end of a range is not served.
        let mut wide = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut wide));
        assert!(!bus.read(u64::MAX, &mut wide));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(d.clone(), 0x1000, 0x1000).unwrap();
        assert!(matches!(
            bus.insert(d.clone(), 0x1fff, 1),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d.clone(), 0x0, 0x1001),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d.clone(), 0x5000, 0),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(d.clone(), u64::MAX, 2),
            Err(Error::BadRange { .. })
        ));
        bus.insert(d, 0x2000, 0x1000).unwrap();
    }
}
