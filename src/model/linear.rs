//! A weight matrix and its products with activations.
//!
//! On x86_64, matrices of the types our kernels take stay where they are, in the GGUF file's
//! memory map: loading copies nothing, and the pages are shared with the page cache. Where the
//! level's kernels run faster on another layout (Q4_K and Q6_K at avx512vnni: 16 rows
//! interleaved), the matrix is copied into it at load and its pages of the map are let go.
//! Other types (Q2_K, Q3_K, Q5_0, BF16, ...), and every type on other CPUs, are copied into
//! candle's quantized storage and multiplied by candle.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo, TensorType};
use crate::kernels::interleaved::Interleaved;
use crate::kernels::{self, Kernels};

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
        data: Range<usize>,
        kernels: &'static Kernels,
    },
    /// Copied out of the map into the layout the level's kernels run fastest on.
    Interleaved {
        weights: Interleaved,
        kernels: &'static Kernels,
    },
    Candle {
        tensor: Arc<QTensor>,
        matmul: QMatMul,
    },
}

impl Linear {
    /// `tensor` of `file`, already checked to be a `(rows, cols)` matrix (ggml dims `[cols, rows]`);
    /// `repack`: copied into the level's faster layout where it has one.
    pub fn new(
        file: &Arc<GgufFile>,
        tensor: &TensorInfo,
        rows: usize,
        cols: usize,
        repack: bool,
    ) -> Result<Self> {
        let own = OWN_KERNELS
            .then(|| kernels::find(kernels::level(), tensor.dtype).ok())
            .flatten();
        let storage = if let Some(kernels) = own {
            let align = kernels.align;
            if !(file.tensor_data(tensor).as_ptr() as usize).is_multiple_of(align) {
                return Err(Error::unsupported(format!(
                    "tensor '{}' starts at offset {}, not aligned to {align} bytes",
                    tensor.name, tensor.offset
                )));
            }
            match kernels.interleaved {
                Some(interleaving) if repack && interleaving.kernels.layout.takes(rows) => {
                    let bytes = file.tensor_data(tensor);
                    let bpr = kernels
                        .blocks_per_row(bytes, rows, cols)
                        .map_err(|e| e.at_tensor(&tensor.name))?;
                    let weights = (interleaving.make)(bytes, bpr)?;
                    file.release(tensor.data());
                    Storage::Interleaved {
                        weights,
                        kernels: &interleaving.kernels,
                    }
                }
                _ => Storage::Mapped {
                    file: file.clone(),
                    data: tensor.data(),
                    kernels,
                },
            }
        } else {
            let data = QStorage::from_data(
                Cow::Borrowed(file.tensor_data(tensor)),
                &Device::Cpu,
                candle_type(tensor.dtype),
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
            Storage::Mapped {
                file,
                data,
                kernels,
            } => {
                let weights = file.bytes(data.clone());
                kernels.gemm(weights, self.rows, self.cols, x, n, out)
            }
            Storage::Interleaved { weights, kernels } => {
                kernels.gemm(weights.bytes(), self.rows, self.cols, x, n, out)
            }
            Storage::Candle { matmul, .. } => {
                let x = Tensor::from_slice(x, (n, self.cols), &Device::Cpu)?;
                let y = matmul.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
                Ok(())
            }
        }
    }

    /// Whether the matrix was copied into another layout at load.
    #[cfg(test)]
    pub fn is_repacked(&self) -> bool {
        matches!(self.storage, Storage::Interleaved { .. })
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
            Storage::Mapped {
                file,
                data,
                kernels,
            } => kernels.dequantize_row(file.bytes(data.clone()), self.rows, row, out),
            Storage::Interleaved { weights, kernels } => {
                kernels.dequantize_row(weights.bytes(), self.rows, row, out)
            }
            Storage::Candle { tensor, .. } => {
                let id = Tensor::new(&[row as u32], &Device::Cpu)?;
                out.copy_from_slice(&tensor.embedding(&id)?.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }
}

/// Candle's name for a GGUF tensor type: where a matrix is left to candle.
pub(crate) fn candle_type(t: TensorType) -> GgmlDType {
    match t {
        TensorType::F32 => GgmlDType::F32,
        TensorType::F16 => GgmlDType::F16,
        TensorType::BF16 => GgmlDType::BF16,
        TensorType::Q4_0 => GgmlDType::Q4_0,
        TensorType::Q4_1 => GgmlDType::Q4_1,
        TensorType::Q5_0 => GgmlDType::Q5_0,
        TensorType::Q5_1 => GgmlDType::Q5_1,
        TensorType::Q8_0 => GgmlDType::Q8_0,
        TensorType::Q8_1 => GgmlDType::Q8_1,
        TensorType::Q2K => GgmlDType::Q2K,
        TensorType::Q3K => GgmlDType::Q3K,
        TensorType::Q4K => GgmlDType::Q4K,
        TensorType::Q5K => GgmlDType::Q5K,
        TensorType::Q6K => GgmlDType::Q6K,
        TensorType::Q8K => GgmlDType::Q8K,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader's sizes are the ones candle computes with, type by type.
    #[test]
    fn tensor_types_have_candles_block_sizes() {
        for t in TensorType::ALL {
            let c = candle_type(t);
            assert_eq!(
                (t.block_size(), t.type_size()),
                (c.block_size(), c.type_size()),
                "{t}"
            );
            assert_eq!(format!("{t:?}"), format!("{c:?}"));
        }
    }
}
