//! x86_64 kernels. Every function here is `#[target_feature]`: call one only when
//! [`super::hardware_level`] is at least its level.

pub mod avx2;
pub mod avx512;
