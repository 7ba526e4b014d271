pub use crate::kernels::reference::*;
