//! A device's own event loop thread, on event-manager.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// The subscriber type the loop runs.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Ends the loop when its eventfd is signalled.
struct Stopper {
    evt: EventFd,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch the stop event: {e}");
        }
    }
}

/// A thread running one device's subscriber until dropped.
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts a thread named `name` serving `subscriber`.
    pub fn start(name: &str, subscriber: Subscriber) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopper = Stopper {
            evt: stop.try_clone()?,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let flag = stopper.stop.clone();
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        manager.add_subscriber(subscriber);
        manager.add_subscriber(Arc::new(Mutex::new(stopper)));
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("event loop: {e:?}");
                        return;
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
