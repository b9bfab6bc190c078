//! The worker of a virtio device with a backend (a TAP, sockets): a thread that waits for the
//! backend to become readable, or for the guest to notify a queue (KVM signals an eventfd on the
//! notify register's write: the vCPU does not wait for the device), and then has the transport
//! process that queue. Everything it does happens under the transport's lock, so pausing it is
//! a flag the transport checks (`MmioTransport::process_input`).
//!
//! After handing the guest input, the worker polls for its next event for a few microseconds
//! before it sleeps: a driver usually answers input at once (a reply to transmit, buffers to
//! refill), and on this kind of host a sleep and a wake-up of the worker cost more than that
//! wait. It polls only then: after anything else, the next event is the backend's, which the
//! host's other threads (the peer on the TAP) need the CPU to produce.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use rustix::event::{epoll, eventfd, EventfdFlags};
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;
use crate::devices::bus::lock;

const INPUT: u64 = 0;
const STOP: u64 = 1;
/// Queue `q`'s notifications have epoll data NOTIFY + q.
const NOTIFY: u64 = 2;
/// How long the worker polls for the guest's answer to input before it sleeps.
const ANSWER_POLL: Duration = Duration::from_micros(20);

/// A running input worker; dropping it stops the thread.
pub struct InputWorker {
    /// An eventfd; the thread holds it too, so its epoll registration outlives this handle.
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl InputWorker {
    /// Starts a thread that processes queue `queue` of `transport` whenever `fd` is readable, and
    /// queue `q` whenever `notifies[q]` is signalled. It ends when the transport is gone or the
    /// worker is dropped.
    pub fn spawn(
        name: String,
        fd: BorrowedFd<'_>,
        queue: usize,
        notifies: Vec<EventFd>,
        transport: Weak<Mutex<MmioTransport>>,
    ) -> io::Result<Self> {
        let stop = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let poll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // Edge-triggered: a frame left in the backend for want of guest buffers is taken when the
        // guest adds buffers (its notification), not by this thread spinning on it.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        epoll::add(&poll, fd, epoll::EventData::new_u64(INPUT), flags)?;
        epoll::add(&poll, &*stop, epoll::EventData::new_u64(STOP), epoll::EventFlags::IN)?;
        for (q, evt) in notifies.iter().enumerate() {
            // SAFETY: the eventfd's descriptor stays open as long as `notifies`, which the thread owns.
            let fd = unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) };
            // Edge-triggered, and never read: each signal is an event of its own (epoll(7) queues
            // one on every wake-up of a readable file), so its count need not be cleared.
            epoll::add(&poll, fd, epoll::EventData::new_u64(NOTIFY + q as u64), flags)?;
        }
        let thread_stop = stop.clone();
        let thread =
            std::thread::Builder::new().name(name).spawn(move || run(poll, thread_stop, queue, notifies, transport))?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

fn run(
    poll: OwnedFd,
    _stop: Arc<OwnedFd>,
    queue: usize,
    // Owned for as long as their epoll registrations are used; never read (see `spawn`).
    _notifies: Vec<EventFd>,
    transport: Weak<Mutex<MmioTransport>>,
) {
    let mut events: Vec<epoll::Event> = Vec::with_capacity(4);
    let mut poll_until = None;
    loop {
        events.clear();
        let timeout = match poll_until {
            Some(until) if Instant::now() < until => Some(rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }),
            _ => {
                poll_until = None;
                None
            }
        };
        match epoll::wait(&poll, rustix::buffer::spare_capacity(&mut events), timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("virtio input worker: epoll_wait: {e}");
                return;
            }
        }
        if !events.is_empty() {
            poll_until = None;
        }
        for event in &events {
            let data = event.data.u64();
            if data == STOP {
                return;
            }
            let target = match data {
                INPUT => queue,
                n => (n - NOTIFY) as usize,
            };
            let Some(transport) = transport.upgrade() else { return };
            if lock(&transport).process_input(target, data == INPUT) && target == queue {
                poll_until = Some(Instant::now() + ANSWER_POLL);
            }
        }
    }
}

impl Drop for InputWorker {
    fn drop(&mut self) {
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        // Not joined: the last reference to the transport (whose drop drops this) may be the
        // worker's own, taken while it processes input.
        drop(self.thread.take());
    }
}
