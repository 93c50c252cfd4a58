//! The loader's one module with `unsafe`: marking meshpath's shared map types as plain old
//! data for aya. Everything else in userspace is safe code.

use meshpath_common::{WorkloadKey, WorkloadValue};

/// [`WorkloadKey`] as an aya map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct PodKey(pub WorkloadKey);

/// [`WorkloadValue`] as an aya map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct PodValue(pub WorkloadValue);

// SAFETY: `WorkloadKey` is `#[repr(C)]` around `[u8; 16]`: no padding, every bit pattern
// valid; `repr(transparent)` keeps that layout.
unsafe impl aya::Pod for PodKey {}
// SAFETY: `WorkloadValue` is `#[repr(C)]` of two `u32` with no padding (checked by the
// layout test in meshpath-common); every bit pattern is valid.
unsafe impl aya::Pod for PodValue {}
