//! Saving and restoring the state of a piece of the VM as plain data.
//!
//! Every device, every vCPU and the VM itself implement [`Persist`]: [`Persist::save`] returns
//! a value of plain serde data (no file descriptors, no pointers, no guest memory), and
//! [`Persist::restore`] builds a fresh instance from such a value plus the resources that
//! cannot be serialised (guest memory, eventfds, disk backends, sockets, KVM file
//! descriptors). This is the shape of Firecracker's `Persist` trait.
//!
//! Restored state is untrusted: it comes from a file a user may have edited or that may be
//! corrupt. `restore` checks every field it relies on (sizes, addresses inside guest memory,
//! status and feature bits that agree with each other, known versions) and refuses a bad one
//! with an error naming the field ([`StateError`]), never panicking.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A piece of the VM whose state can be saved and restored.
pub trait Persist: Sized {
    /// The saved state: plain data.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug + PartialEq;
    /// What `restore` needs besides the state: memory, eventfds, backends, sockets.
    type Resources;
    /// Why a restore failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The current state. The caller has paused whatever could change it.
    fn save(&self) -> Self::State;

    /// A fresh instance in `state`, built on `resources`.
    fn restore(resources: Self::Resources, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A saved state that cannot be restored: which field is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid saved state: {field}: {reason}")]
pub struct StateError {
    /// The field, as a path (`queues[1].size`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl StateError {
    /// `field` is wrong because of `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error for a field inside `parent` (`queues[1]` + `size` → `queues[1].size`).
    pub fn within(self, parent: impl std::fmt::Display) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}

/// Checks `ok`, or returns a [`StateError`] for `field`.
pub fn check(ok: bool, field: &str, reason: impl FnOnce() -> String) -> Result<(), StateError> {
    if ok {
        Ok(())
    } else {
        Err(StateError::new(field, reason()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_nested_field() {
        let e = StateError::new("size", "0 is not a power of two").within("queues[1]");
        assert_eq!(
            e.to_string(),
            "invalid saved state: queues[1].size: 0 is not a power of two"
        );
        assert!(check(true, "x", || unreachable!()).is_ok());
        assert_eq!(
            check(false, "x", || "bad".into()),
            Err(StateError::new("x", "bad"))
        );
    }
}
