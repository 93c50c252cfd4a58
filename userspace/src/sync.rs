//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, also when an earlier holder panicked: every critical section in meshpath is a
/// single update of plain data, so a poisoned lock still guards a consistent value, and a
/// panic in one connection's task must not take the whole proxy down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
