//! x86_64 kernels. Every kernel here is `#[target_feature]` (or, for a whole product, `unsafe`):
//! call one only when [`super::hardware_level`] is at least its level.

pub mod avx2;
pub mod avx2_gemm;
pub mod avx512;
pub mod avx512_gemm;
