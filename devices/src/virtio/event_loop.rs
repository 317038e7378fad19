//! A device's own event loop thread, on event-manager, that can be paused and that reports its
//! own death.
//!
//! The loop runs two subscribers: the device, and a controller that owns the loop's control
//! eventfds (stop, pause) and the device's [`Mailbox`] (activation and reset from the
//! transport, carried out here on the device thread). Pausing is a handshake on a mutex and a
//! condition variable: [`EventLoop::pause`] asks, the controller (served between two of the
//! device's events, so after the device finished what it was doing) delivers the mailbox,
//! reports itself parked and blocks until [`EventLoop::resume`] or the loop is dropped. While it
//! blocks the thread runs nothing: the device touches neither guest memory nor its rings nor
//! its host sockets; events that arrive meanwhile wait in the epoll set (a vsock host client
//! waits in the listen backlog).
//!
//! A loop that ends other than by being dropped (event-manager fails, or the device panics)
//! calls its [`FailureSink`] with the reason, and [`EventLoop::pause`] then fails instead of
//! waiting for a thread that is gone.
//!
//! The mailbox knows whether its thread is serving ([`Mailbox::set_serving`]): false while the
//! loop is parked or after it ended, so that a vCPU resetting the device does not wait for a
//! thread that cannot answer (a device is paused after the vCPUs, but a pause that is undone
//! or a resume that fails can leave a device parked while vCPUs run). The reset then completes
//! asynchronously once the loop is resumed (see [`crate::virtio`]). Pausing never waits for a
//! vCPU: the controller delivers the mailbox, so a reset a vCPU waits for is done before the
//! thread parks.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{Mailbox, VirtioDevice};

/// A device thread that died: which device and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFailure {
    /// The loop's (thread's) name, e.g. `virtio-blk0`.
    pub device: String,
    /// Why it ended.
    pub reason: String,
}

impl std::fmt::Display for DeviceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device {} stopped: {}", self.device, self.reason)
    }
}

/// Where a loop reports its death; the VMM's control loop is on the other side.
pub type FailureSink = Arc<dyn Fn(DeviceFailure) + Send + Sync>;

/// Errors of pause and resume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoopError {
    /// The device thread is gone.
    #[error("the device thread of {0} has stopped")]
    Dead(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    PauseRequested,
    Paused,
    Stopping,
    Dead,
}

/// What the VMM and the thread share.
struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The loop's own subscriber: stop, pause, and the mailbox.
struct Controller<D: VirtioDevice> {
    stop: EventFd,
    pause: EventFd,
    gate: Arc<Gate>,
    mailbox: Arc<Mailbox>,
    device: Arc<Mutex<D>>,
}

impl<D: VirtioDevice> Controller<D> {
    fn deliver(&self) {
        let mut device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        self.mailbox.deliver(&mut *device);
    }

    /// Parks the thread until resumed or stopped.
    fn park(&self) {
        // Commands posted before the pause take effect now, so that a saved state has them.
        self.deliver();
        let mut state = self.gate.lock();
        if *state != State::PauseRequested {
            return;
        }
        *state = State::Paused;
        self.gate.changed.notify_all();
        // A vCPU resetting the device meanwhile does not wait for a parked thread.
        self.mailbox.set_serving(false);
        while *state == State::Paused {
            state = self
                .gate
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        self.mailbox.set_serving(true);
    }
}

impl<D: VirtioDevice> MutEventSubscriber for Controller<D> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::fd::AsRawFd::as_raw_fd(&self.pause) {
            let _ = self.pause.read();
            self.park();
        } else if fd == std::os::fd::AsRawFd::as_raw_fd(self.mailbox.eventfd()) {
            self.deliver();
        } else {
            let _ = self.stop.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.stop, &self.pause, self.mailbox.eventfd()] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("event loop: cannot watch a control event: {e}");
            }
        }
    }
}

/// A thread running one device's subscriber until dropped.
pub struct EventLoop {
    name: String,
    stop: EventFd,
    pause: EventFd,
    gate: Arc<Gate>,
    thread: Option<JoinHandle<()>>,
}

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

/// What every device thread calls first (see [`EventLoop::set_thread_start_hook`]).
static THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

impl EventLoop {
    /// Sets the function every device thread calls before it serves its device (the VMM
    /// installs the device threads' seccomp filter there). Only the first call counts.
    pub fn set_thread_start_hook(hook: fn()) {
        let _ = THREAD_START.set(hook);
    }

    /// Starts a thread named `name` serving `device` and its `mailbox`; if the thread ever
    /// ends on its own, `on_failure` hears why.
    pub fn start<D>(
        name: &str,
        device: Arc<Mutex<D>>,
        mailbox: Arc<Mailbox>,
        on_failure: FailureSink,
    ) -> std::io::Result<Self>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let pause = EventFd::new(libc::EFD_NONBLOCK)?;
        let gate = Arc::new(Gate {
            state: Mutex::new(State::Running),
            changed: Condvar::new(),
        });
        let controller = Controller {
            stop: stop.try_clone()?,
            pause: pause.try_clone()?,
            gate: gate.clone(),
            mailbox: mailbox.clone(),
            device: device.clone(),
        };
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        manager.add_subscriber(device);
        manager.add_subscriber(Arc::new(Mutex::new(controller)));
        let thread_gate = gate.clone();
        let thread_mailbox = mailbox.clone();
        let thread_name = name.to_string();
        mailbox.set_serving(true);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                THREAD_START.get().inspect(|hook| hook());
                let gate = thread_gate;
                let result = catch_unwind(AssertUnwindSafe(|| loop {
                    if *gate.lock() == State::Stopping {
                        return Ok(());
                    }
                    if let Err(e) = manager.run() {
                        return Err(format!("its event loop failed: {e:?}"));
                    }
                }));
                let reason = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(why)) => Some(why),
                    Err(p) => Some(format!("it panicked: {}", panic_text(p.as_ref()))),
                };
                thread_mailbox.set_serving(false);
                let stopping = std::mem::replace(&mut *gate.lock(), State::Dead) == State::Stopping;
                gate.changed.notify_all();
                if let Some(reason) = reason.filter(|_| !stopping) {
                    log::error!("virtio: device {thread_name} stopped: {reason}");
                    on_failure(DeviceFailure {
                        device: thread_name,
                        reason,
                    });
                }
            })
            .inspect_err(|_| mailbox.set_serving(false))?;
        Ok(Self {
            name: name.to_string(),
            stop,
            pause,
            gate,
            thread: Some(thread),
        })
    }

    /// The loop's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the device between two events; returns once it will touch nothing until
    /// [`EventLoop::resume`]. Waits for the event being served to finish (a block request with
    /// its I/O), never for more.
    pub fn pause(&self) -> Result<(), LoopError> {
        let mut state = self.gate.lock();
        match *state {
            State::Paused => return Ok(()),
            State::Dead | State::Stopping => return Err(LoopError::Dead(self.name.clone())),
            State::Running | State::PauseRequested => {}
        }
        *state = State::PauseRequested;
        if let Err(e) = self.pause.write(1) {
            *state = State::Running;
            log::error!("event loop {}: cannot signal a pause: {e}", self.name);
            return Err(LoopError::Dead(self.name.clone()));
        }
        while *state == State::PauseRequested {
            state = self
                .gate
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        match *state {
            State::Paused => Ok(()),
            _ => Err(LoopError::Dead(self.name.clone())),
        }
    }

    /// Lets a paused device run again.
    pub fn resume(&self) -> Result<(), LoopError> {
        let mut state = self.gate.lock();
        match *state {
            State::Paused | State::PauseRequested => {
                *state = State::Running;
                self.gate.changed.notify_all();
                Ok(())
            }
            State::Running => Ok(()),
            State::Dead | State::Stopping => Err(LoopError::Dead(self.name.clone())),
        }
    }

    /// Whether the device thread is parked.
    pub fn is_paused(&self) -> bool {
        *self.gate.lock() == State::Paused
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        {
            let mut state = self.gate.lock();
            if *state != State::Dead {
                *state = State::Stopping;
            }
        }
        self.gate.changed.notify_all();
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, GuestMemory, Interrupt};
    use std::sync::mpsc;
    use std::time::Duration;
    use virtio_queue::{Queue, QueueState};

    /// Counts its events; panics on demand.
    struct Counter {
        evt: EventFd,
        seen: Arc<std::sync::atomic::AtomicU32>,
        panic_on: u32,
    }

    impl VirtioDevice for Counter {
        fn device_type(&self) -> u32 {
            0
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[]
        }
        fn config_space(&self) -> Vec<u8> {
            Vec::new()
        }
        fn activate(
            &mut self,
            _: GuestMemory,
            _: Arc<Interrupt>,
            _: Vec<Queue>,
            _: u64,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn queue_states(&self) -> Vec<QueueState> {
            Vec::new()
        }
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            assert_ne!(n, self.panic_on, "injected failure");
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    fn start(
        panic_on: u32,
    ) -> (
        EventLoop,
        EventFd,
        Arc<std::sync::atomic::AtomicU32>,
        mpsc::Receiver<DeviceFailure>,
    ) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let dev = Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
            panic_on,
        }));
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: FailureSink = Arc::new(move |f| {
            let _ = tx.lock().unwrap().send(f);
        });
        let el = EventLoop::start("counter", dev, Mailbox::new().unwrap(), sink).unwrap();
        (el, evt, seen, rx)
    }

    fn wait_for(seen: &std::sync::atomic::AtomicU32, n: u32) {
        // Hang guard only: generous.
        for _ in 0..10_000 {
            if seen.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the loop never served event {n}");
    }

    #[test]
    fn a_paused_loop_serves_nothing_until_resumed() {
        let (el, evt, seen, _rx) = start(0);
        evt.write(1).unwrap();
        wait_for(&seen, 1);
        el.pause().unwrap();
        assert!(el.is_paused());
        evt.write(1).unwrap();
        // The loop is parked on the condition variable: nothing it could serve was served.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        el.resume().unwrap();
        wait_for(&seen, 2);
        // Pause twice, drop while paused: no hang.
        el.pause().unwrap();
        el.pause().unwrap();
        drop(el);
    }

    #[test]
    fn a_panicking_device_reports_its_death_and_pause_fails() {
        let (el, evt, _seen, rx) = start(1);
        evt.write(1).unwrap();
        let failure = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(failure.device, "counter");
        assert!(failure.reason.contains("injected failure"), "{failure}");
        assert_eq!(el.pause(), Err(LoopError::Dead("counter".into())));
        drop(el);
        assert!(rx.try_recv().is_err(), "reported once");
    }

    #[test]
    fn dropping_a_loop_is_not_a_failure() {
        let (el, _evt, _seen, rx) = start(0);
        drop(el);
        assert!(rx.try_recv().is_err());
    }
}
