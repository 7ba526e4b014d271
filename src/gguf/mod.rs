//! GGUF files: a hardened reader over a memory map, typed metadata, and the names of every key
//! and tensor phi3 uses.

pub mod metadata;
pub mod names;
pub mod reader;
pub mod tensor_type;

pub use metadata::{Metadata, Value};
pub use reader::{GgufFile, TensorInfo};
pub use tensor_type::TensorType;

#[cfg(test)]
mod test_writer;
#[cfg(test)]
mod tests;
