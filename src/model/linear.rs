//! A weight matrix and its products with activations.
//!
//! On x86_64, matrices of the types our kernels take stay where they are, in the GGUF file's
//! memory map: loading copies nothing, and the pages are shared with the page cache. Other types
//! (Q2_K, Q3_K, Q5_0, BF16, ...), and every type on other CPUs, are copied into candle's
//! quantized storage and multiplied by candle.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::kernels;

/// Off x86_64 our kernels are only the scalar reference, and candle's NEON ones are faster.
const OWN_KERNELS: bool = cfg!(target_arch = "x86_64");

pub struct Linear {
    rows: usize,
    cols: usize,
    storage: Storage,
}

enum Storage {
    Mapped {
        file: Arc<GgufFile>,
        tensor: TensorInfo,
    },
    Candle {
        tensor: Arc<QTensor>,
        matmul: QMatMul,
    },
}

impl Linear {
    /// `tensor` of `file`, already checked to be a `(rows, cols)` matrix (ggml dims `[cols, rows]`).
    pub fn new(
        file: &Arc<GgufFile>,
        tensor: &TensorInfo,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let storage = if OWN_KERNELS && kernels::SUPPORTED.contains(&tensor.dtype) {
            let align = if tensor.dtype == GgmlDType::F32 { 4 } else { 2 };
            if !(file.tensor_data(tensor).as_ptr() as usize).is_multiple_of(align) {
                return Err(Error::unsupported(format!(
                    "tensor '{}' starts at offset {}, not aligned to {align} bytes",
                    tensor.name, tensor.offset
                )));
            }
            Storage::Mapped {
                file: file.clone(),
                tensor: tensor.clone(),
            }
        } else {
            let data = QStorage::from_data(
                Cow::Borrowed(file.tensor_data(tensor)),
                &Device::Cpu,
                tensor.dtype,
            )?;
            let tensor = Arc::new(QTensor::new(data, (rows, cols))?);
            Storage::Candle {
                matmul: QMatMul::from_arc(tensor.clone())?,
                tensor,
            }
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
    }

    /// `out = x Wᵀ`: `x` is `n` rows of `cols` values, `out` `n` rows of `rows` values.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        match &self.storage {
            Storage::Mapped { file, tensor } => {
                let weights = file.tensor_data(tensor);
                let (rows, cols, dtype) = (self.rows, self.cols, tensor.dtype);
                kernels::gemm(dtype, weights, rows, cols, x, n, out)
            }
            Storage::Candle { matmul, .. } => {
                let x = Tensor::from_slice(x, (n, self.cols), &Device::Cpu)?;
                let y = matmul.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
                Ok(())
            }
        }
    }

    /// Row `row` of the matrix, dequantized into `out` (`cols` values): an embedding lookup.
    pub fn row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows || out.len() != self.cols {
            return Err(Error::invalid_argument(format!(
                "row {row} of {} ({} values into {})",
                self.rows,
                self.cols,
                out.len()
            )));
        }
        match &self.storage {
            Storage::Mapped { file, tensor } => {
                let row_bytes = tensor.size_bytes / self.rows;
                let bytes = &file.tensor_data(tensor)[row * row_bytes..][..row_bytes];
                kernels::dequantize::dequantize_row(tensor.dtype, bytes, out)
            }
            Storage::Candle { tensor, .. } => {
                let id = Tensor::new(&[row as u32], &Device::Cpu)?;
                out.copy_from_slice(&tensor.embedding(&id)?.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }
}
