//! Finds a GGUF file's tensors for the model, checking each one's presence, type and shape
//! against the hyper-parameters first.

use std::sync::Arc;

use super::linear::Linear;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo, TensorType};

pub struct WeightLoader<'a> {
    file: &'a Arc<GgufFile>,
    /// Whether matrices are repacked where the kernels run faster so.
    repack: bool,
}

impl<'a> WeightLoader<'a> {
    pub fn new(file: &'a Arc<GgufFile>, repack: bool) -> Self {
        Self { file, repack }
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    /// The tensor's info, checked to have `dims` (ggml order: innermost first).
    fn info(&self, name: &str, dims: &[usize]) -> Result<&'a TensorInfo> {
        self.checked_info(name, dims).map_err(|e| e.at_tensor(name))
    }

    fn checked_info(&self, name: &str, dims: &[usize]) -> Result<&'a TensorInfo> {
        let info = self
            .file
            .tensor(name)
            .ok_or_else(|| Error::unsupported(format!("tensor '{name}' is missing")))?;
        if info.dims != dims {
            return Err(Error::unsupported(format!(
                "tensor '{name}' has shape {:?}, the hyper-parameters call for {dims:?}",
                info.dims
            )));
        }
        Ok(info)
    }

    /// A quantized (or float) matrix of `rows` outputs by `cols` inputs.
    pub fn matmul(&self, name: &str, cols: usize, rows: usize) -> Result<Linear> {
        let info = self.info(name, &[cols, rows])?;
        Linear::new(self.file, info, rows, cols, self.repack).map_err(|e| e.at_tensor(name))
    }

    /// A matrix only looked up row by row (an embedding table that is not also the output):
    /// never repacked, so that only the rows looked up are ever read.
    pub fn table(&self, name: &str, cols: usize, rows: usize) -> Result<Linear> {
        let info = self.info(name, &[cols, rows])?;
        Linear::new(self.file, info, rows, cols, false).map_err(|e| e.at_tensor(name))
    }

    /// A 1-D float vector (norm weights, RoPE factors), converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.float_vector(name, len).map_err(|e| e.at_tensor(name))
    }

    fn float_vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let info = self.checked_info(name, &[len])?;
        let bytes = self.file.tensor_data(info);
        let values: Vec<f32> = match info.dtype {
            TensorType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            TensorType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            TensorType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::unsupported(format!(
                    "tensor '{name}' is {other:?}; a float type (F32, F16, BF16) is expected"
                )))
            }
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::unsupported(format!(
                "tensor '{name}' holds a non-finite value at index {i}"
            )));
        }
        Ok(values)
    }
}
