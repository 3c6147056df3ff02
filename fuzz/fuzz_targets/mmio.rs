//! The virtio-mmio transport: register reads and writes at any offset, of
//! any size and value, against a real device (virtio-blk on a scratch
//! image, or virtio-vsock on a scratch socket) whose event-loop side runs
//! too, so activations, kicks, resets and snapshots (saved, sent through
//! JSON, tampered with, restored into a fresh transport) reach the device.
//! Refused features, failed activations and refused restores are
//! expected; a panic is a bug.
//!
//! Input (little endian): a config byte (bit 0 vsock, else blk; bit 1
//! read-only disk), then actions, each an opcode byte (modulo 8) and its
//! fields.
//! - 0 write: offset, size, value u64.  1 read: offset, size.
//!   An offset is a byte: below 0x40 the register at 4 times it, below 0x80
//!   a byte of config space, 0xff a u64 that follows, else a u16 that
//!   follows. A size is a byte: 0-3 four bytes, 4 one, 5 two, 6 eight, 7 a
//!   count byte follows.
//! - 2 the Linux driver's sequence: features u64, then per queue its size
//!   (log2, u8) and ring base (u16), then DRIVER_OK.
//! - 3 bytes into guest memory: address u16, count u8, bytes.
//! - 4 the event loop runs.  5 queue notify: queue u8, then the loop runs.
//! - 6 snapshot and restore: the field to tamper with u8 (0 none), its
//!   value u64.  7 the device resumes (after a snapshot).
//!
//! Guest memory is 64 KiB in two regions.

#![no_main]

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use smol_fuzz::{scratch_dir, scratch_file, Input};
use smol_vmm::devices::bus::BusDevice;
use smol_vmm::devices::virtio::blk::Block;
use smol_vmm::devices::virtio::mmio::{self, MmioTransport, TransportState};
use smol_vmm::devices::virtio::vsock::Vsock;
use smol_vmm::devices::virtio::{DeviceState, GuestMemory, Interrupt, VirtioDevice};
use smol_vmm::DiskConfig;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const REGION: usize = 32 << 10;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

struct Scratch {
    image: tempfile::NamedTempFile,
    dir: tempfile::TempDir,
}

fn scratch() -> &'static Mutex<Scratch> {
    static S: OnceLock<Mutex<Scratch>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(Scratch {
            image: scratch_file(),
            dir: scratch_dir(),
        })
    })
}

fuzz_target!(|data: &[u8]| run(data));

/// A transport, its device and the device's event loop.
struct Rig {
    transport: MmioTransport,
    em: EventManager<Subscriber>,
}

fn rig(vsock: bool, read_only: bool, image: &Path, uds: &Path, mem: &GuestMemory) -> Rig {
    let (device, sub): (Arc<Mutex<dyn VirtioDevice>>, Subscriber) = if vsock {
        let d = Arc::new(Mutex::new(Vsock::new(3, uds).expect("vsock socket")));
        (d.clone(), d)
    } else {
        let config = DiskConfig {
            path: image.to_owned(),
            read_only,
            id: "fuzz".into(),
        };
        let d = Arc::new(Mutex::new(Block::new(&config).expect("block device")));
        (d.clone(), d)
    };
    let queues = device.lock().unwrap().queue_max_sizes().len();
    let notify = (0..queues)
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let transport = MmioTransport::new(device, mem.clone(), Interrupt::new(irq), notify)
        .expect("a transport for the device");
    let mut em = EventManager::<Subscriber>::new().expect("event manager");
    em.add_subscriber(sub);
    Rig { transport, em }
}

impl Rig {
    fn pump(&mut self) {
        for _ in 0..8 {
            match self.em.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }
}

fn offset(input: &mut Input) -> u64 {
    match input.u8() {
        b @ 0..0x40 => u64::from(b) * 4,
        b @ 0x40..0x80 => mmio::REG_CONFIG + u64::from(b - 0x40),
        0xff => input.u64(),
        _ => u64::from(input.u16()),
    }
}

fn size(input: &mut Input) -> usize {
    match input.u8() % 8 {
        0..=3 => 4,
        4 => 1,
        5 => 2,
        6 => 8,
        _ => usize::from(input.u8()),
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let vsock = cfg & 1 != 0;
    let read_only = cfg & 2 != 0;

    let scratch = scratch().lock().unwrap_or_else(|e| e.into_inner());
    scratch
        .image
        .as_file()
        .set_len(0)
        .expect("truncate the image");
    scratch
        .image
        .as_file()
        .set_len(64 << 10)
        .expect("size the image");
    let uds = scratch.dir.path().join("v.sock");
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ])
    .expect("guest memory");
    let mut rig = rig(vsock, read_only, scratch.image.path(), &uds, &mem);
    let queue_count = if vsock { 3 } else { 1 };

    while !input.is_empty() {
        match input.u8() % 8 {
            0 => {
                let offset = offset(&mut input);
                let size = size(&mut input);
                let value = input.u64().to_le_bytes();
                let data: Vec<u8> = value.iter().copied().cycle().take(size).collect();
                rig.transport.write(offset, &data);
            }
            1 => {
                let offset = offset(&mut input);
                let mut data = vec![0u8; size(&mut input)];
                rig.transport.read(offset, &mut data);
            }
            2 => {
                use mmio::*;
                let features = input.u64();
                rig.write(REG_STATUS, 0);
                rig.write(REG_STATUS, STATUS_ACKNOWLEDGE);
                rig.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                rig.write(REG_DRIVER_FEATURES_SEL, 0);
                rig.write(REG_DRIVER_FEATURES, features as u32);
                rig.write(REG_DRIVER_FEATURES_SEL, 1);
                rig.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
                let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
                rig.write(REG_STATUS, features_ok);
                for q in 0..queue_count {
                    let size = 1u32 << (input.u8() % 9);
                    let desc = u32::from(input.u16());
                    let avail = desc + 16 * size;
                    let used = (avail + 6 + 2 * size + 3) & !3;
                    rig.write(REG_QUEUE_SEL, q);
                    rig.write(REG_QUEUE_NUM, size);
                    rig.write(REG_QUEUE_DESC_LOW, desc);
                    rig.write(REG_QUEUE_DESC_HIGH, 0);
                    rig.write(REG_QUEUE_DRIVER_LOW, avail);
                    rig.write(REG_QUEUE_DRIVER_HIGH, 0);
                    rig.write(REG_QUEUE_DEVICE_LOW, used);
                    rig.write(REG_QUEUE_DEVICE_HIGH, 0);
                    rig.write(REG_QUEUE_READY, 1);
                }
                rig.write(REG_STATUS, features_ok | STATUS_DRIVER_OK);
                rig.pump();
            }
            3 => {
                let addr = u64::from(input.u16());
                let n = usize::from(input.u8());
                let _ = mem.write_slice(input.bytes(n), GuestAddress(addr));
            }
            4 => rig.pump(),
            5 => {
                let q = u32::from(input.u8() % 4);
                rig.write(mmio::REG_QUEUE_NOTIFY, q);
                rig.pump();
            }
            6 => {
                let field = input.u8();
                let value = input.u64();
                let state = rig.transport.save_state();
                let json = serde_json::to_vec(&state).expect("the state serializes");
                let mut state: TransportState =
                    serde_json::from_slice(&json).expect("the state reads back");
                tamper(&mut state, field, value);
                // The old device goes first: it holds the disk's lock and
                // the socket's path.
                drop(rig);
                rig = self::rig(vsock, read_only, scratch.image.path(), &uds, &mem);
                if rig.transport.restore_state(&state).is_ok() {
                    let _ = rig.transport.raise_restored_interrupt();
                }
                rig.pump();
            }
            _ => {
                rig.transport.resume_device();
                rig.pump();
            }
        }
    }
}

/// A snapshot is read back from a file: untrusted.
fn tamper(state: &mut TransportState, field: u8, value: u64) {
    let v32 = value as u32;
    let v16 = value as u16;
    let pick = (value >> 32) as usize;
    match field % 14 {
        0 => {}
        1 => state.status = v32,
        2 => state.driver_features = value,
        3 => state.queue_sel = v32,
        4 => state.interrupt_status = v32,
        5 => state.device_type = v32,
        6 => state.device_queues = None,
        7 => {
            state.device = DeviceState::Vsock {
                next_local_port: v32,
            }
        }
        8 => {
            state.device = DeviceState::Net {
                mac: [v16 as u8; 6],
                link_up: value & 1 != 0,
            }
        }
        f => {
            let queues = if f % 2 == 0 {
                state.queues.as_mut_slice()
            } else {
                match state.device_queues.as_mut() {
                    Some(q) => q.as_mut_slice(),
                    None => return,
                }
            };
            let n = queues.len();
            if n == 0 {
                return;
            }
            let q = &mut queues[pick % n];
            match f {
                9 | 10 => {
                    q.next_avail = v16;
                    q.next_used = (value >> 16) as u16;
                }
                11 | 12 => {
                    q.size = v16;
                    q.max_size = (value >> 16) as u16;
                    q.ready = value & (1 << 31) != 0;
                }
                _ => {
                    q.desc_table = u64::from(v32);
                    q.avail_ring = u64::from(v32.rotate_left(8));
                    q.used_ring = u64::from(v32.rotate_left(16));
                }
            }
        }
    }
}
