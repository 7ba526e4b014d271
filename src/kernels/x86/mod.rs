//! x86_64 kernels. Every function here is `#[target_feature]`: call one only when
//! [`super::hardware_level`] is at least its level.

// These kernels need Rust 1.89 (AVX-512 intrinsics and target features; safe intrinsic calls
// inside `#[target_feature]` functions need 1.87), above the crate's declared rust-version 1.85:
// the declaration has to be raised to 1.89 when this module is wired in.
#![allow(clippy::incompatible_msrv)]

pub mod avx2;
pub mod avx512;
