//! The virtio-mmio transport (version 2, virtio 1.x): the register window the guest programs, and
//! the queues it sets up. Every guest-written value is checked; a hostile guest can only break
//! its own device.

use crate::vstate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::input::InputWorker;
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::persist::{DeviceState, DurableFile, Persist};
use crate::devices::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x004d_4d56; // "VMM"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Where the QueueNotify register is in the transport's window.
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;

/// Interrupt status bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: EventFd,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// The queue the device's backend input goes to, and the thread that waits for that input.
    input_queue: Option<usize>,
    input_worker: Option<InputWorker>,
    /// Set while the VM is paused: input waits in the backend, notifications in their eventfds.
    input_paused: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, interrupt: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            input_queue: None,
            input_worker: None,
            input_paused: false,
        }
    }

    /// Whether the device has a backend to wait on (a TAP, sockets), and so wants a worker.
    pub fn has_input(&self) -> bool {
        self.device.input_fd().is_some()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Starts the worker of a device that has a backend to wait on. `notifies[q]` is signalled
    /// when the guest notifies queue `q` (an ioeventfd KVM signals on the QueueNotify write), so
    /// a vCPU never waits for such a device.
    pub fn start_input_worker(
        this: &std::sync::Arc<std::sync::Mutex<Self>>,
        name: &str,
        notifies: Vec<EventFd>,
    ) -> std::io::Result<()> {
        let mut transport = crate::devices::bus::lock(this);
        let Some((fd, queue)) = transport.device.input_fd() else { return Ok(()) };
        let worker = InputWorker::spawn(format!("{name}-io"), fd, queue, notifies, std::sync::Arc::downgrade(this))?;
        transport.input_worker = Some(worker);
        transport.input_queue = Some(queue);
        Ok(())
    }

    /// The device's backend has input for queue `index` (`readable`), or the guest notified it
    /// (called by the input worker); returns whether the device used buffers of that queue.
    pub fn process_input(&mut self, index: usize, readable: bool) -> bool {
        if self.input_paused {
            return false;
        }
        if readable {
            self.device.input_readable();
        }
        self.notify(index as u32)
    }

    /// Takes whatever input waits in the backend, and whatever the guest queued, as the worker
    /// would (its wake-ups while the VM was paused or being built were ignored).
    fn poll_input(&mut self) {
        if let Some(input) = self.input_queue {
            for q in 0..self.queues.len() {
                self.process_input(q, q == input);
            }
        }
    }

    /// The transport's registers and queues. The device must be quiescent (vCPUs paused).
    pub fn snapshot(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
            device_state: self.device.save_state(),
        }
    }

    /// Puts this freshly built transport in the saved state (its device must be of the saved
    /// type), and activates the device if the driver had.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() || state.queues.len() != self.queues.len() {
            return Err(format!(
                "saved virtio device type {} with {} queues, this one is type {} with {}",
                state.device_type,
                state.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for saved in &state.queues {
            queues.push(Queue::try_from(saved.to_queue_state()).map_err(|e| format!("virtio queue state: {e}"))?);
        }
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt_status = state.interrupt_status;
        self.device.restore_state(state.device_state.as_ref())?;
        if self.driver_ok() {
            self.device.activate(self.driver_features);
        }
        Ok(())
    }

    /// Once the machine is restored: signals the interrupt again if the guest has not
    /// acknowledged it, lets the device tell the outside world, and takes the input that
    /// reached the backend while the VM was being restored.
    pub fn restored(&mut self) {
        if self.driver_ok() {
            self.device.restored();
        }
        if self.interrupt_status != 0 {
            self.signal_interrupt();
        }
        self.poll_input();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Queue registers may only change while the driver sets up and the queue is not live.
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Status bits are only ever added; clearing them takes a reset (a write of 0).
        if value & self.status != self.status {
            tracing::debug!("virtio: status {value:#x} clears bits of {:#x}; ignored", self.status);
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Leave FEATURES_OK (and anything that needs it) clear: the driver reads the
                // status back and gives up.
                self.status = value & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                return;
            }
        }
        if new_bits & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            let mem = &self.mem;
            if self.queues.iter().any(|q| q.ready() && !q.is_valid(mem)) {
                tracing::warn!("virtio: driver enabled an invalid queue; device needs reset");
                self.status = value | STATUS_NEEDS_RESET;
                return;
            }
            self.device.activate(self.driver_features);
            self.status = value;
            // Input that arrived before the driver was ready.
            self.poll_input();
            return;
        }
        self.status = value;
    }

    /// Has the device process queue `index`; returns whether it used buffers of it.
    fn notify(&mut self, index: u32) -> bool {
        if !self.driver_ok() || !self.queues.get(index as usize).is_some_and(|q| q.ready()) {
            return false;
        }
        let used = self.device.process_queue(index as usize, &mut self.queues, &self.mem);
        if used {
            self.raise_interrupt(INT_USED_RING);
        }
        used
    }

    /// Sets `bits` in the interrupt status and signals the guest, unless they were all set
    /// already: the guest has not acknowledged the last signal yet, and its handler reads the
    /// status (and the used rings) after acknowledging. As QEMU's level-triggered line, this
    /// costs nothing while a polling driver leaves the status set; each signal otherwise wakes
    /// a KVM worker thread, which injects it into the IOAPIC.
    fn raise_interrupt(&mut self, bits: u32) {
        let new = bits & !self.interrupt_status;
        self.interrupt_status |= bits;
        if new != 0 {
            self.signal_interrupt();
        }
    }

    fn signal_interrupt(&mut self) {
        if let Err(e) = self.interrupt.write(1) {
            tracing::warn!("virtio: cannot signal interrupt: {e}");
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => {
                self.notify(value & 0xffff);
            }
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH => {
                if !self.queue_config_allowed() {
                    return;
                }
                let Some(q) = self.selected_queue() else { return };
                match offset {
                    REG_QUEUE_NUM => q.set_size(value as u16),
                    REG_QUEUE_READY => q.set_ready(value == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                    REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                    REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                    REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
                    _ => {}
                }
            }
            _ => tracing::debug!("virtio-mmio: write {value:#x} to {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and aligned; anything else is a driver bug we ignore.
        if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// Layout version of `MmioTransportState` (2: the device's own state).
const STATE_VERSION: u32 = 2;

impl Persist for MmioTransport {
    fn save(&self) -> DeviceState {
        DeviceState::encode(STATE_VERSION, &self.snapshot())
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), String> {
        self.restore_state(&state.decode(STATE_VERSION)?)
    }

    fn restored(&mut self) {
        MmioTransport::restored(self);
    }

    fn pause_workers(&mut self) {
        // What the guest queued before its vCPUs stopped (transmits above all) completes now,
        // so the saved state has nothing in flight.
        self.poll_input();
        self.input_paused = true;
    }

    fn resume_workers(&mut self) {
        self.input_paused = false;
        // The worker's wake-ups during the pause were ignored: take what waits now.
        self.poll_input();
    }

    fn durable_file(&self) -> Option<DurableFile> {
        self.device.durable_file()
    }

    fn start_disk_copy(
        &mut self,
        dest: std::fs::File,
        only: Option<&[u64]>,
    ) -> Option<std::sync::Arc<std::sync::Mutex<super::disk_copy::DiskCopier>>> {
        self.device.start_disk_copy(dest, only)
    }

    fn take_written_chunks(&mut self) -> Option<Vec<u64>> {
        self.device.take_written_chunks()
    }

    fn return_written_chunks(&mut self, chunks: &[u64]) {
        self.device.return_written_chunks(chunks)
    }

    fn end_disk_copy(&mut self) {
        self.device.end_disk_copy();
    }

    fn describe(&self) -> String {
        format!("{} (status {:#x}, features {:#x})", self.device.describe(), self.status, self.driver_features)
    }
}

/// A virtio queue as saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    fn to_queue_state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
        }
    }
}

/// The transport's registers and queues, as saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state (a network device's waiting frame, say); added in version 2.
    #[serde(default)]
    pub device_state: Option<DeviceState>,
}
